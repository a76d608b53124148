"""Which layers become sliding-window layers, and with what window (docs/design.md §4)."""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, Iterable, Mapping, Sequence

from .ops.checks import check_int

SLIDING, FULL = "sliding_attention", "full_attention"
_KEYS = ("window", "swa_layers", "num_layers")   # of to_dict / from_dict


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A window ``W`` (tokens, the current one included) and the set of SWA layers of a ``num_layers`` model.

    Frozen and validated; ``str()`` prints a one-line map (``S`` = SWA, ``F`` = full), ``to_dict`` /
    ``from_dict`` and ``to_json`` / ``from_json`` round-trip it. An empty selection is allowed.
    """

    window: int
    swa_layers: frozenset[int]
    num_layers: int

    def __init__(self, window: int, swa_layers: Iterable[int], num_layers: int):
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
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "swa_layers", frozenset(layers))
        object.__setattr__(self, "num_layers", num_layers)

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
                raise ValueError("config has sliding_attention layer_types but no sliding_window")
            window = 1  # nothing slides: the window is never used
        if num_layers is not None and len(layer_types) != num_layers:
            raise ValueError(f"config.layer_types has {len(layer_types)} entries for num_hidden_layers={num_layers}")
        return cls.from_layer_types(layer_types, window)

    # --------------------------------------------------------------------------------------- queries
    def is_swa(self, layer: int) -> bool:
        return layer in self.swa_layers

    def layer_types(self) -> list[str]:
        return [SLIDING if self.is_swa(i) else FULL for i in range(self.num_layers)]

    def check_num_layers(self, num_layers: int) -> None:
        if num_layers != self.num_layers:
            raise ValueError(f"schedule is for {self.num_layers} layers, the model has {num_layers}")

    # ------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window, "swa_layers": sorted(self.swa_layers), "num_layers": self.num_layers}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Schedule":
        """The inverse of ``to_dict``: exactly the keys ``window``, ``swa_layers`` and ``num_layers``."""
        if not isinstance(d, Mapping):
            raise TypeError(f"a schedule dict must be a mapping with keys {list(_KEYS)}, got {d!r}")
        unknown = set(d) - set(_KEYS)
        if unknown:
            raise ValueError(f"unknown schedule keys {sorted(map(str, unknown))}, expected {list(_KEYS)}")
        missing = [k for k in _KEYS if k not in d]
        if missing:
            raise ValueError(f"schedule dict is missing key(s) {missing} (has {sorted(map(str, d))}, "
                             f"needs {list(_KEYS)})")
        return cls(d["window"], d["swa_layers"], d["num_layers"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        layout = "".join("S" if self.is_swa(i) else "F" for i in range(self.num_layers))
        return (f"Schedule(window={self.window}, {len(self.swa_layers)}/{self.num_layers} SWA layers: {layout})")

    def __repr__(self) -> str:
        return f"Schedule(window={self.window}, swa_layers={sorted(self.swa_layers)}, num_layers={self.num_layers})"
