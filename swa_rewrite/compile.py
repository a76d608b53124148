"""``torch.compile`` integration (docs/design.md §8): a Dynamo backend, an Inductor post-grad pass, ``compile``.

``torch.compile(model, backend=swa_rewrite.backend(schedule))`` runs the same passes as ``apply`` on each
Dynamo graph (in *partial* mode: a graph may hold any part of the model), then hands the graph to Inductor.
``SWAPostGradPass`` is the same rewrite as an Inductor custom post-grad pass with a stable ``uuid()``, for
engines that own their pass manager. ``swa_rewrite.compile`` wraps a model so that its forward is compiled
through the backend and its ``allocate_kv_cache`` returns the packed caches of the SWA layers.

With Inductor (the default ``inner``) the backend also decomposes the MLA core ops of steps without MHA rows into
absorb BMM, MQA attention op and un-absorb BMM (``decompose_mqa_cores``), and runs each compiled graph inside
``ops.checks.compiled_graph`` (its ops skip the shape checks the trace ran): an uncompiled-graph step is paced by
the host (issue 14), and both take host work out of it.

Dynamo and Inductor are imported when a backend or pass is built or used, not by ``import swa_rewrite``
(Inductor alone takes seconds to import).

A step may run with grad mode on: the ops' backward is traceable and raises only if it runs
(``ops/inference_only.py``); ``torch.no_grad()`` still saves the activations AOTAutograd keeps for it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from typing import Any, Callable, Optional, Union

import torch
import torch.fx
import torch.fx.experimental._config

from .passes import (AdapterRegistry, PassManager, PassResult, RewriteError, TracedModel, default_registry,
                     swa_pass_manager)
from .ops.checks import checks_disabled, compiled_graph
from .schedule import Schedule

log = logging.getLogger(__name__)


def _num_layers(module: Any) -> Optional[int]:
    """The layer count a module states (``config.num_hidden_layers``, else ``num_layers``), or None. A layer
    module with the model's config (``MLAAttention``) states the model's count too."""
    for value in (getattr(getattr(module, "config", None), "num_hidden_layers", None),
                  getattr(module, "num_layers", None)):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _compiled_module() -> Optional[torch.nn.Module]:
    """The module whose ``forward`` Dynamo is compiling now, or None (a function, or not under Dynamo).

    A backend sees one graph, which may hold any part of the model, so the graph cannot say how many layers
    the model has; the frame Dynamo compiles can. Read through Dynamo's current instruction translator
    (private, so any failure just means "unknown").
    """
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        module = tx.output.root_tx.f_locals.get("self") if tx is not None else None
    except Exception:  # noqa: BLE001 - another torch version: the check is best-effort
        return None
    return module if isinstance(module, torch.nn.Module) else None


def _check_model_layers(schedule: Schedule, module: Optional[torch.nn.Module]) -> None:
    """As ``apply`` does: a schedule for another layer count is a RewriteError (the layers the model lacks would
    otherwise be silently ignored)."""
    num_layers = _num_layers(module)
    if num_layers is not None and num_layers != schedule.num_layers:
        raise RewriteError(f"the schedule is for {schedule.num_layers} layers, the model has {num_layers}")


def _rewrite(schedule: Schedule, registry: Optional[AdapterRegistry], traced: TracedModel) -> list[PassResult]:
    """The compile-time rewrite of one graph (partial: any part of the model) of the module being compiled."""
    _check_model_layers(schedule, _compiled_module())
    return _pass_manager(schedule, registry)(traced)


def _pass_manager(schedule: Schedule, registry: Optional[AdapterRegistry]) -> PassManager:
    """The compile-time pipeline: ``apply``'s passes (``passes.swa_passes``) in partial mode."""
    return swa_pass_manager(schedule, registry, partial=True)


def _allocate_packed(model: torch.nn.Module, schedule: Schedule, registry: Optional[AdapterRegistry],
                     num_blocks: int, page_size: int, device) -> list[torch.Tensor]:
    """``model``'s caches with the schedule's layers in the packed layout, marked as static addresses so
    CUDA graphs can capture their in-place writes."""
    from .rewrite import apply

    caches = apply(model, schedule, registry=registry).allocate_kv_cache(num_blocks, page_size, device)
    for c in caches:
        torch._dynamo.mark_static_address(c)
    return caches


def _kv_cache_spec(model: torch.nn.Module, schedule: Schedule, registry: Optional[AdapterRegistry]) -> tuple:
    """The ``KVCacheSpec`` of each layer of ``model`` compiled with ``schedule``: the rewrite's own (the graph
    the backend compiles sets the same groups, ``ops.kv_cache_spec.schedule_cache_groups``)."""
    from .rewrite import apply

    return apply(model, schedule, registry=registry).kv_cache_spec()


class SWABackend:
    """A ``torch.compile`` backend: rewrite the Dynamo graph, then compile it with ``inner``.

    ``inner`` is ``"inductor"`` (default), ``"eager"`` (run the rewritten graph as is) or any backend
    callable. ``results`` keeps the pass results of every graph compiled, newest last.
    """

    def __init__(self, schedule: Schedule, *, inner: Union[str, Callable] = "inductor",
                 registry: Optional[AdapterRegistry] = None):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a swa_rewrite.Schedule, got {type(schedule).__name__}")
        self.schedule, self.inner, self.registry = schedule, inner, registry
        self.results: list[list[PassResult]] = []
        self.pass_seconds = 0.0   # time spent in the rewrite itself, all graphs
        self.rewrite_error: Optional[Exception] = None   # why the last graph could not be rewritten

    def uuid(self) -> str:
        return _pass_manager(self.schedule, self.registry).uuid()

    def allocate_kv_cache(self, model: torch.nn.Module, num_blocks: int, page_size: int,
                          device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The caches a model compiled with this backend needs: packed ``uint8`` for the SWA layers."""
        return _allocate_packed(model, self.schedule, self.registry, num_blocks, page_size, device)

    def kv_cache_spec(self, model: torch.nn.Module) -> tuple:
        """One ``KVCacheSpec`` per layer of ``model`` compiled with this backend (docs/design.md §12): sliding
        layers with their window and sinks over the packed ``uint8`` row, the others full."""
        return _kv_cache_spec(model, self.schedule, self.registry)

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, *, mqa_steps: bool = False, **kwargs: Any):
        """Rewrite and compile ``gm``. ``mqa_steps``: the caller runs this graph only for steps without MHA rows
        (``SWACompiledModel``'s MQA entry), so Inductor gets every MLA core op decomposed (``decompose_mqa_cores``)."""
        t0 = time.perf_counter()
        try:
            self.results.append(_rewrite(self.schedule, self.registry, TracedModel(gm)))
        except (RewriteError, TypeError) as e:
            self.rewrite_error = e       # Dynamo wraps it; swa_rewrite.compile unwraps exactly this one
            raise
        self.pass_seconds += time.perf_counter() - t0
        log.info("swa_rewrite backend: %s", "; ".join(str(r) for r in self.results[-1]))
        if self.inner == "eager":
            return gm.forward
        if self.inner == "inductor":
            from torch._inductor.compile_fx import compile_fx

            # torch.compile(mode=..., options=...) with a custom backend passes these through to us.
            patches = dict(kwargs.get("options") or {})
            if kwargs.get("mode"):
                patches.update(torch._inductor.list_mode_options(kwargs["mode"], kwargs.get("dynamic")))
            patches = inductor_defaults(patches, example_inputs)
            decompose_mqa_cores(gm, no_mha_rows=mqa_steps)
            return _in_compiled_graph(compile_fx(gm, example_inputs, config_patches=patches or None))
        return self.inner(gm, example_inputs, **kwargs)


def inductor_defaults(patches: dict, example_inputs: list) -> dict:
    """Inductor's config ``patches`` with the backend's defaults added: ``cpp_wrapper`` for a graph with CUDA inputs.

    A decode step compiled without CUDA graphs is paced by the host, which issues ~100 launches a step; Inductor's
    C++ wrapper issues them from compiled code instead of Python (H200, 32 decodes, RESULTS.md issue 14 run 12: a
    step's host time ~25 % lower, the rewritten model's speed-up over the original 1.00 -> 1.03x at 4K, 1.22 ->
    1.28x at 32K, 1.54 -> 1.59x at 128K). Its cost is a one-time C++ compile (~60 s cold, then Inductor's caches).
    Left as given when ``patches`` names ``cpp_wrapper`` (``options={"cpp_wrapper": False}`` opts out), with
    Inductor's CUDA graphs (``mode="reduce-overhead"``: replays issue nothing from the wrapper) and on the CPU
    (compiling the kernels' C++ there costs more than a Python wrapper saves)."""
    if "cpp_wrapper" in patches or patches.get("triton.cudagraphs"):
        return patches
    if any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in example_inputs):
        return dict(patches, cpp_wrapper=True)
    return patches


def decompose_mqa_cores(gm: torch.fx.GraphModule, *, no_mha_rows: bool = False) -> int:
    """Replace each MLA core op of ``gm`` whose step has no MHA rows by its decomposed form
    (``ops.mla_attention.DECOMPOSED``: absorb BMM, the MQA attention op, un-absorb BMM), which Inductor then traces
    into graph operations. Inductor issues those from its generated code, where the fused op spent ~16 dispatched
    tensor operations and its own Python per layer on the host (issue 14: an uncompiled-graph step is paced by the
    host). A step has no MHA rows when the caller says so (``no_mha_rows``: it runs the graph only for such steps)
    or when ``mha_kv_slots [G, M]`` has the static size ``M = 0`` in the graph's example values (plain
    ``torch.compile`` specialises a size 0); a core whose ``M`` is nonzero or symbolic keeps the fused op.
    Returns how many were replaced."""
    from .ops.mla_attention import DECOMPOSED
    from .passes.graph_pass import op_name

    replaced = 0
    for node in gm.graph.nodes:
        decomposed = DECOMPOSED.get(op_name(node.target)) if node.op == "call_function" else None
        if decomposed is None:
            continue
        op = node.target if isinstance(node.target, torch._ops.OpOverload) else node.target.default
        at = [a.name for a in op._schema.arguments].index("mha_kv_slots")
        slots = node.args[at] if len(node.args) > at else node.kwargs.get("mha_kv_slots")
        meta = slots.meta if isinstance(slots, torch.fx.Node) else {}
        value = meta.get("example_value", meta.get("val"))
        M = value.shape[-1] if isinstance(value, torch.Tensor) else None
        if no_mha_rows and type(M) is int and M > 0:
            raise RewriteError(f"a step with MHA rows (mha_kv_slots [G, {M}]) reached the MQA-step entry, whose "
                               "graphs run every core in MQA mode")
        if no_mha_rows or (type(M) is int and M == 0):
            node.target = decomposed
            replaced += 1
    if replaced:
        gm.recompile()
    return replaced


def _in_compiled_graph(compiled: Callable) -> Callable:
    """``compiled`` (an Inductor graph) run inside ``checks.compiled_graph``: AOTAutograd traced the rewritten graph
    through every op's fake implementation, which checked the shapes its ops then skip (~10 µs of host per attention
    op, issue 14). A graph taking its arguments as one list (``_boxed_call``) keeps that convention."""

    @functools.wraps(compiled)
    def run(*args):
        with compiled_graph():
            return compiled(*args)

    return run


def backend(schedule: Schedule, *, inner: Union[str, Callable] = "inductor",
            registry: Optional[AdapterRegistry] = None) -> SWABackend:
    """``torch.compile(model, backend=swa_rewrite.backend(schedule))``."""
    return SWABackend(schedule, inner=inner, registry=registry)


class SWAPostGradPass:
    """The rewrite as an Inductor custom post-grad pass (``torch._inductor.config.post_grad_custom_post_pass``).

    Post-grad graphs show in-place ops as ``auto_functionalized`` nodes; the adapters rewrite those too.
    ``uuid()`` hashes the passes' source and the schedule, so Inductor's cache key changes with either.
    A graph with no MLA attention op while the schedule selects layers is logged as a warning (the model was
    probably not built with the ops the adapters know). An Inductor ``CustomGraphPass`` (registered as a virtual subclass when the first one is built, so that
    ``import swa_rewrite`` does not import Inductor; Inductor only checks ``isinstance``).
    """

    def __init__(self, schedule: Schedule, registry: Optional[AdapterRegistry] = None):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a swa_rewrite.Schedule, got {type(schedule).__name__}")
        _register_with_inductor()
        self.schedule, self.registry = schedule, registry
        self.results: list[list[PassResult]] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None:
            gm = torch.fx.GraphModule(torch.nn.Module(), graph)
        traced = TracedModel(gm)
        self.results.append(_rewrite(self.schedule, self.registry, traced))
        if self.schedule.swa_layers and not any(site.attention for site in traced.sites.values()):
            log.warning("swa_rewrite post-grad pass: the schedule selects layers %s but this graph (%d nodes) holds "
                        "no MLA attention op (searched for %s), so nothing was rewritten. Usually the model was not "
                        "built with these ops (or its engine's ops have no adapter registered); harmless for a "
                        "graph that holds only part of the model (after a graph break).",
                        sorted(self.schedule.swa_layers), len(graph.nodes),
                        (self.registry or default_registry()).op_names())

    def uuid(self) -> str:
        return _pass_manager(self.schedule, self.registry).uuid()

    def allocate_kv_cache(self, model: torch.nn.Module, num_blocks: int, page_size: int,
                          device: torch.device | str | None = None) -> list[torch.Tensor]:
        """The caches a model compiled with this pass needs: packed ``uint8`` for the SWA layers."""
        return _allocate_packed(model, self.schedule, self.registry, num_blocks, page_size, device)

    def kv_cache_spec(self, model: torch.nn.Module) -> tuple:
        """One ``KVCacheSpec`` per layer of ``model`` compiled with this pass (docs/design.md §12): sliding
        layers with their window and sinks over the packed ``uint8`` row, the others full."""
        return _kv_cache_spec(model, self.schedule, self.registry)


@functools.cache
def _register_with_inductor() -> None:
    """Make ``SWAPostGradPass`` a ``torch._inductor.custom_graph_pass.CustomGraphPass`` (an ABC), importing
    Inductor on first use."""
    try:
        from torch._inductor.custom_graph_pass import CustomGraphPass
    except ImportError:  # pragma: no cover - very old torch: no custom pass interface to join
        return
    CustomGraphPass.register(SWAPostGradPass)


class _MQAStepBackend:
    """``backend`` compiling the graphs of ``SWACompiledModel``'s MQA entry (steps without MHA rows)."""

    def __init__(self, backend: SWABackend):
        self.backend = backend

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any):
        return self.backend(gm, example_inputs, mqa_steps=True, **kwargs)


def _mqa_entry(model: torch.nn.Module) -> Callable:
    """A function calling ``model`` for steps without MHA rows, with a code object of its own (per call of this
    function), so Dynamo keeps its graphs apart from those of ``model.forward`` and of other compiled models: each
    code object has its own cache and recompile budget. ``forward`` leaves ``M`` static here (0: its graphs guard
    on it), and the backend refuses a graph whose ``M`` is a nonzero constant."""

    def mqa_step(*args: Any, **kwargs: Any):
        return model(*args, **kwargs)

    # A fresh code object of a unique name: Dynamo keys its cache on the object, and its sizes' automatic-dynamic
    # history on the name.
    mqa_step.__code__ = mqa_step.__code__.replace(co_name=f"mqa_step_{next(_MQA_ENTRIES)}")
    return mqa_step


_MQA_ENTRIES = itertools.count()


def _mha_slots(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The step's ``mha_kv_slots [G, M]`` (from its ``StepMetadata``: ``meta=`` or a positional argument), or None."""
    meta = kwargs.get("meta")
    if meta is None:
        meta = next((a for a in args if hasattr(a, "mha_kv_slots")), None)
    slots = getattr(meta, "mha_kv_slots", None)
    return slots if isinstance(slots, torch.Tensor) else None


def _mark_dynamic_step_inputs(args: tuple, kwargs: dict, static_slots: Optional[torch.Tensor] = None) -> None:
    """Mark every dimension of the integer step tensors (tokens, batch, block-table width, cache groups) dynamic:
    ``input_ids``, ``logits_indices`` and every tensor of the ``StepMetadata`` (a pytree, so its leaves), but the
    row count ``M`` of ``static_slots`` (a step without MHA rows: ``M = 0`` stays a constant of its graphs)."""
    for t in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dtype in (torch.int32, torch.int64):
            for dim in range(t.dim() - (t is static_slots)):
                torch._dynamo.maybe_mark_dynamic(t, dim)


class SWACompiledModel(torch.nn.Module):
    """``model`` compiled through ``SWABackend``, with the packed cache allocation of the schedule.

    ``forward`` marks the token/batch dimension of the integer step inputs dynamic (so a generation does not
    recompile every step), and caches from ``allocate_kv_cache`` are marked as static addresses so CUDA
    graphs (``mode="reduce-overhead"``) can be captured around their in-place writes.
    """

    def __init__(self, model: torch.nn.Module, schedule: Schedule, **compile_kwargs: Any):
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a swa_rewrite.Schedule, got {type(schedule).__name__}")
        _check_model_layers(schedule, model)     # now, not at the first step
        self.model = model
        self.swa_backend = SWABackend(schedule, registry=compile_kwargs.pop("registry", None),
                                      inner=compile_kwargs.pop("inner", "inductor"))
        self.__dict__["_compiled"] = torch.compile(model, backend=self.swa_backend, **compile_kwargs)
        # Steps without MHA rows (decodes, MQA-mode chunks) run through their own entry, whose Inductor graphs
        # have every MLA core op decomposed: the dynamic sizes here keep M symbolic, so one graph cannot tell.
        self.__dict__["_compiled_mqa"] = (
            torch.compile(_mqa_entry(model), backend=_MQAStepBackend(self.swa_backend), **compile_kwargs)
            if self.swa_backend.inner == "inductor" else self._compiled)
        self.config = getattr(model, "config", None)

    def allocate_kv_cache(self, num_blocks: int, page_size: int,
                          device: torch.device | str | None = None) -> list[torch.Tensor]:
        return self.swa_backend.allocate_kv_cache(self.model, num_blocks, page_size, device)

    def kv_cache_spec(self) -> tuple:
        """One ``KVCacheSpec`` per layer: the backend's (``SWABackend.kv_cache_spec``)."""
        return self.swa_backend.kv_cache_spec(self.model)

    def forward(self, *args: Any, **kwargs: Any):
        slots = _mha_slots(args, kwargs)
        mqa = slots is not None and slots.shape[-1] == 0 and self._compiled_mqa is not self._compiled
        _mark_dynamic_step_inputs(args, kwargs, static_slots=slots if mqa else None)
        # Sizes 0 and 1 would otherwise be specialised on every input. One recompile remains, for the first
        # one-token step: the reshape of the attention output guards on whether a copy is needed (T == 1).
        # Input checks read tensor values (a host round trip per op): off inside the compiled step.
        with torch.fx.experimental._config.patch(backed_size_oblivious=True), checks_disabled():
            compiled = self._compiled_mqa if mqa else self._compiled
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                # The rewrite's own errors (a schedule or model it cannot rewrite) surface as apply raises them,
                # not wrapped in Dynamo's backend failure.
                if e.inner_exception is not None and e.inner_exception is self.swa_backend.rewrite_error:
                    raise e.inner_exception from None
                raise


def compile(model: torch.nn.Module, schedule: Schedule, **torch_compile_kwargs: Any) -> SWACompiledModel:
    """``torch.compile`` ``model`` through the SWA backend; ``torch_compile_kwargs`` go to ``torch.compile``
    (``fullgraph``, ``dynamic``, ``mode``, ``options``), plus ``inner`` (``"inductor"`` / ``"eager"``). On CUDA,
    Inductor compiles with its C++ wrapper unless ``options`` says otherwise (``inductor_defaults``)."""
    return SWACompiledModel(model, schedule, **torch_compile_kwargs)
