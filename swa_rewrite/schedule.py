"""Which layers become sliding-window layers, with what window and sinks (docs/design.md §4)."""

from __future__ import annotations

import collections
import dataclasses
import json
import numbers
from typing import Any, Iterable, Mapping, Optional, Sequence

from .ops.checks import check_int

SLIDING, FULL = "sliding_attention", "full_attention"
_KEYS = ("window", "swa_layers", "num_layers")   # of to_dict / from_dict
_OPTIONAL_KEYS = ("windows", "sinks")             # per-layer windows and sinks, written when not empty


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class Schedule:
    """The SWA layers of a ``num_layers`` model, each with its window ``W`` (tokens, the current one included)
    and its number of sink tokens ``s >= 0`` (docs/design.md §3, §4).

    ``Schedule(window, swa_layers, num_layers)`` gives every SWA layer the window ``window`` and no sinks.
    ``windows={layer: W}`` overrides the window of some SWA layers; ``sinks`` is one count for every SWA layer
    or ``{layer: s}`` (layers not named: 0). ``Schedule.per_layer({layer: W or (W, s)}, num_layers)`` builds
    the same from one mapping. ``window_of(layer)`` / ``sinks_of(layer)`` answer per layer; ``window`` is the
    one window of a schedule whose SWA layers share it (``ValueError`` when they do not).

    Frozen, hashable and validated; schedules that give every layer the same window and sinks are equal however
    they were spelled. ``str()`` prints a one-line map (``S`` = SWA, ``F`` = full), ``to_dict`` / ``from_dict``
    and ``to_json`` / ``from_json`` round-trip it. An empty selection is allowed.
    """

    # Canonical state (equality and hashing use it): the most common window of the SWA layers (the given one
    # when none slide), the layers whose window differs from it, and the layers with sinks > 0.
    _window: int
    swa_layers: frozenset[int]
    num_layers: int
    _windows: tuple[tuple[int, int], ...]
    _sinks: tuple[tuple[int, int], ...]

    def __init__(self, window: int, swa_layers: Iterable[int], num_layers: int, *,
                 windows: Optional[Mapping[int, int]] = None, sinks: int | Mapping[int, int] = 0):
        # NumPy integers are ints here (a schedule built from a config array); bools and floats are not.
        window, num_layers = check_int("window", window), check_int("num_layers", num_layers)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if isinstance(swa_layers, (str, bytes)) or not isinstance(swa_layers, Iterable):
            raise TypeError(f"swa_layers must be an iterable of layer indices, got {swa_layers!r}")
        layers = []
        for i in swa_layers:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"layer indices must be ints, got {i!r}")
            if not 0 <= i < num_layers:
                raise ValueError(f"layer index {i} is out of range for {num_layers} layers")
            layers.append(int(i))
        layers = sorted(set(layers))
        per_window = {layer: window for layer in layers}
        per_window.update(_per_layer("windows", windows, layers, num_layers, minimum=1))
        if isinstance(sinks, Mapping):
            per_sinks = _per_layer("sinks", sinks, layers, num_layers, minimum=0)
        else:
            count = check_int("sinks", sinks)
            if count < 0:
                raise ValueError(f"sinks must be >= 0, got {count}")
            per_sinks = {layer: count for layer in layers}
        if layers:   # the most common window (the larger on a tie) is the default; the others are listed
            counts = collections.Counter(per_window.values())
            window = max(counts, key=lambda w: (counts[w], w))
        object.__setattr__(self, "_window", window)
        object.__setattr__(self, "swa_layers", frozenset(layers))
        object.__setattr__(self, "num_layers", num_layers)
        object.__setattr__(self, "_windows", tuple((l, w) for l, w in sorted(per_window.items()) if w != window))
        object.__setattr__(self, "_sinks", tuple((l, s) for l, s in sorted(per_sinks.items()) if s > 0))

    def __setstate__(self, state: dict) -> None:
        # Pickles of the single-window Schedule (fields window, swa_layers, num_layers) still load.
        if "_window" not in state:
            state = vars(Schedule(state["window"], state["swa_layers"], state["num_layers"]))
        self.__dict__.update(state)

    @classmethod
    def per_layer(cls, layers: Mapping[int, int | tuple[int, int]], num_layers: int) -> "Schedule":
        """``{layer: W}`` or ``{layer: (W, s)}`` (window and sink count) for each SWA layer; the others stay
        full. An empty mapping is the empty selection."""
        if not isinstance(layers, Mapping):
            raise TypeError(f"per_layer takes a mapping {{layer: window}} or {{layer: (window, sinks)}}, "
                            f"got {layers!r}")
        windows, sinks = {}, {}
        for layer, spec in layers.items():
            if isinstance(spec, tuple):
                if len(spec) != 2:
                    raise ValueError(f"layer {layer!r}: expected a window or a (window, sinks) pair, got {spec!r}")
                windows[layer], sinks[layer] = spec
            else:
                windows[layer] = spec
        validated = _per_layer("windows", windows, None, check_int("num_layers", num_layers), minimum=1)
        default = max(validated.values(), default=1)   # replaced by the most common window
        return cls(default, list(validated), num_layers, windows=validated, sinks=sinks)

    # ------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_skip_freq(cls, freq: int | Sequence[int], num_layers: int, window: int) -> "Schedule":
        """Megatron / FastDeploy ``window_attn_skip_freq``.

        A list: entry ``1`` makes that layer SWA, ``0`` keeps it full (length must be ``num_layers``).
        An int ``n``: 0-based layer ``i`` is SWA iff ``(i + 1) % n != 0`` (every ``n``-th layer stays full).
        """
        num_layers = check_int("num_layers", num_layers)
        if isinstance(freq, numbers.Integral) and not isinstance(freq, bool):
            if freq < 1:
                raise ValueError(f"window_attn_skip_freq must be >= 1, got {freq}")
            return cls(window, [i for i in range(num_layers) if (i + 1) % freq != 0], num_layers)
        if isinstance(freq, (bool, numbers.Number, str, bytes)) or not isinstance(freq, Iterable):
            raise TypeError(f"window_attn_skip_freq must be an int or a list of 0/1, got {freq!r}")
        freq = list(freq)
        if len(freq) != num_layers:
            raise ValueError(f"window_attn_skip_freq has {len(freq)} entries for a model of {num_layers} layers")
        for i, f in enumerate(freq):
            if isinstance(f, bool) or not isinstance(f, numbers.Integral):
                raise TypeError(f"window_attn_skip_freq[{i}] = {f!r}, expected the int 0 (full) or 1 (SWA)")
            if f not in (0, 1):
                raise ValueError(f"window_attn_skip_freq[{i}] = {f!r}, expected 0 (full) or 1 (SWA)")
        return cls(window, [i for i, f in enumerate(freq) if f == 1], num_layers)

    @classmethod
    def from_layer_types(cls, layer_types: Sequence[str], window: int) -> "Schedule":
        """Hugging Face ``layer_types`` (``"sliding_attention"`` / ``"full_attention"``) plus ``sliding_window``."""
        if isinstance(layer_types, (str, bytes)) or not isinstance(layer_types, Iterable):
            raise TypeError(f"layer_types must be a list of {SLIDING!r} / {FULL!r}, got {layer_types!r}")
        layer_types = list(layer_types)
        for i, t in enumerate(layer_types):
            if t not in (SLIDING, FULL):
                raise ValueError(f"layer_types[{i}] = {t!r}, expected {SLIDING!r} or {FULL!r}")
        return cls(window, [i for i, t in enumerate(layer_types) if t == SLIDING], len(layer_types))

    @classmethod
    def from_hf_config(cls, config: Any) -> "Schedule":
        """From a Hugging Face config object or dict with ``layer_types`` and ``sliding_window``.

        Without ``layer_types`` (the case for DeepSeek-V3 checkpoints) every layer stays full, provided the
        config sets no ``sliding_window`` or turns it off (``use_sliding_window=False``, as Qwen2-style
        configs do); a window with no ``layer_types`` does not say which layers slide, so it is an error.
        """
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        num_layers = get("num_hidden_layers")
        layer_types, window = get("layer_types"), get("sliding_window")
        if layer_types is None:
            if num_layers is None:
                raise ValueError("config has neither layer_types nor num_hidden_layers")
            if window is not None and get("use_sliding_window", True) is not False:
                raise ValueError(f"config has sliding_window={window} but no layer_types, so which layers slide "
                                 "is not stated: build the schedule with Schedule(window, swa_layers, num_layers) "
                                 "or Schedule.from_layer_types(...)")
            return cls(window or 1, [], num_layers)
        if window is None:
            if SLIDING in layer_types:
                raise ValueError("config has sliding_attention layer_types but no sliding_window (a model saved "
                                 "with per-layer windows or sinks keeps its schedule under 'swa_rewrite': load it "
                                 "with swa_rewrite.models.from_pretrained or saving.saved_schedule)")
            window = 1  # nothing slides: the window is never used
        if num_layers is not None and len(layer_types) != num_layers:
            raise ValueError(f"config.layer_types has {len(layer_types)} entries for num_hidden_layers={num_layers}")
        return cls.from_layer_types(layer_types, window)

    # --------------------------------------------------------------------------------------- queries
    @property
    def window(self) -> int:
        """The window of every SWA layer (of a schedule with no SWA layer: the window it was built with).
        ``ValueError`` when the SWA layers have different windows: ask ``window_of(layer)`` then."""
        if self._windows:
            raise ValueError(f"this schedule gives its SWA layers different windows {self.windows}: "
                             "there is no one window; use schedule.window_of(layer)")
        return self._window

    @property
    def windows(self) -> dict[int, int]:
        """``{layer: W}`` for every SWA layer (a new dict)."""
        return {layer: self._window for layer in sorted(self.swa_layers)} | dict(self._windows)

    @property
    def sinks(self) -> dict[int, int]:
        """``{layer: s}`` for every SWA layer, ``0`` included (a new dict)."""
        return {layer: 0 for layer in sorted(self.swa_layers)} | dict(self._sinks)

    @property
    def uniform(self) -> bool:
        """Every SWA layer has the same window and no sinks: the single-window schedule of docs/design.md §4,
        which Hugging Face ``layer_types`` + ``sliding_window`` can say."""
        return not self._windows and not self._sinks

    def window_of(self, layer: int) -> int:
        """The window ``W`` of SWA layer ``layer``; ``ValueError`` for a full layer or one out of range."""
        self._check_swa("window_of", layer)
        return dict(self._windows).get(layer, self._window)

    def sinks_of(self, layer: int) -> int:
        """The sink count ``s`` of SWA layer ``layer`` (0: none); ``ValueError`` for a full layer."""
        self._check_swa("sinks_of", layer)
        return dict(self._sinks).get(layer, 0)

    def _check_swa(self, what: str, layer: int) -> None:
        layer = check_int("layer", layer)
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"{what}({layer}): layer index {layer} is out of range for {self.num_layers} layers")
        if layer not in self.swa_layers:
            raise ValueError(f"{what}({layer}): layer {layer} is a full-attention layer, it has no window or sinks "
                             f"(SWA layers: {sorted(self.swa_layers)})")

    def is_swa(self, layer: int) -> bool:
        return layer in self.swa_layers

    def layer_types(self) -> list[str]:
        return [SLIDING if self.is_swa(i) else FULL for i in range(self.num_layers)]

    def check_num_layers(self, num_layers: int) -> None:
        if num_layers != self.num_layers:
            raise ValueError(f"schedule is for {self.num_layers} layers, the model has {num_layers}")

    # ------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """``{"window", "swa_layers", "num_layers"}``, plus ``"windows"`` (the layers whose window is not
        ``window``) and ``"sinks"`` (the layers with sinks) as ``{"layer": count}`` objects when not empty:
        a single-window schedule writes the three keys it always did. The dict is its own JSON."""
        d: dict[str, Any] = {"window": self._window, "swa_layers": sorted(self.swa_layers),
                             "num_layers": self.num_layers}
        if self._windows:
            d["windows"] = {str(layer): w for layer, w in self._windows}
        if self._sinks:
            d["sinks"] = {str(layer): s for layer, s in self._sinks}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Schedule":
        """The inverse of ``to_dict``: the keys ``window``, ``swa_layers`` and ``num_layers``, and optionally
        ``windows`` and ``sinks`` (layer keys as ints or decimal strings, as JSON writes them)."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a schedule dict must be a mapping with keys {list(_KEYS)}, got {d!r}")
        unknown = set(d) - set(_KEYS) - set(_OPTIONAL_KEYS)
        if unknown:
            raise ValueError(f"unknown schedule keys {sorted(map(str, unknown))}, expected {list(_KEYS)} "
                             f"and optionally {list(_OPTIONAL_KEYS)}")
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise ValueError(f"schedule dict is missing key(s) {missing} (has {sorted(map(str, d))}, "
                             f"needs {list(_KEYS)})")
        extra = {k: _layer_keys(k, d[k]) for k in _OPTIONAL_KEYS if k in d}
        return cls(d["window"], d["swa_layers"], d["num_layers"], **extra)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        layout = "".join("S" if self.is_swa(i) else "F" for i in range(self.num_layers))
        windows = sorted(set(self.windows.values())) or [self._window]
        text = f"window={windows[0]}" if len(windows) == 1 else "windows=" + ",".join(map(str, windows))
        sinks = sorted(set(self.sinks.values()))
        if self._sinks:
            text += f", sinks={sinks[0]}" if len(sinks) == 1 else ", sinks=" + ",".join(map(str, sinks))
        return f"Schedule({text}, {len(self.swa_layers)}/{self.num_layers} SWA layers: {layout})"

    def __repr__(self) -> str:
        text = f"Schedule(window={self._window}, swa_layers={sorted(self.swa_layers)}, num_layers={self.num_layers}"
        if self._windows:
            text += f", windows={dict(self._windows)}"
        if self._sinks:
            counts = set(self.sinks.values())
            text += f", sinks={counts.pop()}" if len(counts) == 1 else f", sinks={dict(self._sinks)}"
        return text + ")"


def _per_layer(name: str, values: Optional[Mapping[int, int]], swa_layers: Optional[Sequence[int]],
               num_layers: int, *, minimum: int) -> dict[int, int]:
    """``values`` ({layer: count}) validated: int layers in range (and SWA layers, unless ``swa_layers`` is
    None), int counts ``>= minimum``. Returns a new dict of Python ints."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise TypeError(f"{name} must be a mapping {{layer: count}}, got {values!r}")
    out = {}
    for layer, value in values.items():
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"{name}: layer indices must be ints, got {layer!r}")
        if not 0 <= layer < num_layers:
            raise ValueError(f"{name}: layer index {layer} is out of range for {num_layers} layers")
        if swa_layers is not None and layer not in swa_layers:
            raise ValueError(f"{name}[{layer}]: layer {layer} is not an SWA layer of this schedule "
                             f"(SWA layers: {list(swa_layers)})")
        value = check_int(f"{name}[{layer}]", value)
        if value < minimum:
            raise ValueError(f"{name}[{layer}] must be >= {minimum}, got {value}")
        out[int(layer)] = value
    return out


def _layer_keys(name: str, value: Any) -> Any:
    """A ``{"layer": count}`` object from JSON with its keys as ints (decimal strings only); other values as
    they are, for the constructor to validate (``sinks`` may be one int)."""
    if not isinstance(value, Mapping):
        return value
    out = {}
    for key, count in value.items():
        if isinstance(key, str):
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"{name}: layer key {key!r} is not a layer index")
            key = int(key)
        out[key] = count
    return out
