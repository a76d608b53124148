"""Schedule constructors, validation and serialisation (docs/design.md §4)."""

import json
import random

import pytest

from swa_rewrite import Schedule


def test_skip_freq_list_and_int_agree_with_megatron_semantics():
    n = random.randint(2, 9)
    s = Schedule.from_skip_freq(n, num_layers=24, window=128)
    assert s.swa_layers == {i for i in range(24) if (i + 1) % n != 0}
    as_list = [1 if (i + 1) % n else 0 for i in range(24)]
    assert Schedule.from_skip_freq(as_list, 24, 128) == s
    assert Schedule.from_skip_freq(1, 8, 64).swa_layers == set()   # every layer full


def test_layer_types_and_hf_config():
    types = random.choices(["sliding_attention", "full_attention"], k=10)
    s = Schedule.from_layer_types(types, window=4096)
    assert s.layer_types() == types and s.window == 4096 and s.num_layers == 10
    cfg = {"layer_types": types, "sliding_window": 4096, "num_hidden_layers": 10}
    assert Schedule.from_hf_config(cfg) == s

    class Cfg:
        layer_types, sliding_window, num_hidden_layers = types, 4096, 10
    assert Schedule.from_hf_config(Cfg) == s
    assert Schedule.from_hf_config({"num_hidden_layers": 3}).swa_layers == set()
    assert Schedule.from_hf_config({"layer_types": ["full_attention"] * 2}).swa_layers == set()
    # Qwen2-style: a window that is switched off.
    off = {"num_hidden_layers": 3, "sliding_window": 4096, "use_sliding_window": False}
    assert Schedule.from_hf_config(off).swa_layers == set()


@pytest.mark.parametrize("make,exc,match", [
    (lambda: Schedule(0, [1], 4), ValueError, "window must be >= 1, got 0"),
    (lambda: Schedule(8, [4], 4), ValueError, "layer index 4 is out of range for 4 layers"),
    (lambda: Schedule(8, [-1], 4), ValueError, "layer index -1"),
    (lambda: Schedule(8, [1.0], 4), TypeError, "layer indices must be ints"),
    (lambda: Schedule.from_skip_freq([1, 0, 1], 4, 8), ValueError, "3 entries for a model of 4 layers"),
    (lambda: Schedule.from_skip_freq([1, 2, 1, 0], 4, 8), ValueError, r"window_attn_skip_freq\[1\] = 2"),
    (lambda: Schedule.from_skip_freq(0, 4, 8), ValueError, "window_attn_skip_freq must be >= 1, got 0"),
    (lambda: Schedule.from_layer_types(["full_attention", "local"], 8), ValueError, r"layer_types\[1\] = 'local'"),
    (lambda: Schedule.from_hf_config({"layer_types": ["sliding_attention"]}), ValueError, "no sliding_window"),
    (lambda: Schedule.from_hf_config({"num_hidden_layers": 2, "sliding_window": 64}), ValueError,
     "sliding_window=64 but no layer_types"),
    (lambda: Schedule.from_hf_config({"layer_types": ["full_attention"], "sliding_window": 4,
                                      "num_hidden_layers": 2}), ValueError, "1 entries for num_hidden_layers=2"),
])
def test_bad_schedules_name_the_value(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_round_trip_and_printing():
    layers = random.sample(range(16), 5)
    s = Schedule(512, layers, 16)
    assert Schedule.from_dict(s.to_dict()) == s
    assert Schedule.from_json(s.to_json()) == s
    assert json.loads(s.to_json())["swa_layers"] == sorted(layers)
    text = str(s)
    assert "window=512" in text and "5/16" in text
    assert "".join("S" if i in layers else "F" for i in range(16)) in text
    assert eval(repr(s), {"Schedule": Schedule}) == s
    with pytest.raises(ValueError, match="unknown schedule keys"):
        Schedule.from_dict({**s.to_dict(), "extra": 1})
    with pytest.raises(AttributeError):
        s.window = 3  # frozen
    assert Schedule(8, [], 3).swa_layers == frozenset()


def test_numpy_integers_are_ints():
    np = pytest.importorskip("numpy")
    s = Schedule(np.int64(8), [np.int32(1), np.int64(3)], np.int64(4))
    assert s == Schedule(8, [1, 3], 4)
    assert all(type(v) is int for v in (s.window, s.num_layers, *s.swa_layers))
    assert Schedule.from_json(s.to_json()) == s                      # plain ints: JSON serialises them
    assert Schedule.from_skip_freq(np.int64(2), np.int64(4), np.int64(8)) == Schedule(8, [0, 2], 4)
    assert Schedule.from_skip_freq(np.array([1, 0, 1, 0]), 4, 8) == Schedule(8, [0, 2], 4)
    assert Schedule.from_layer_types(["sliding_attention", "full_attention"], np.int32(16)).window == 16


@pytest.mark.parametrize("make,match", [
    (lambda: Schedule(8.0, [1], 4), r"window must be an integer, got 8\.0"),
    (lambda: Schedule(True, [1], 4), "window must be an integer, got True"),
    (lambda: Schedule(8, [1], 4.0), r"num_layers must be an integer, got 4\.0"),
    (lambda: Schedule(8, [True], 4), "layer indices must be ints, got True"),
    (lambda: Schedule(8, 1, 4), "swa_layers must be an iterable of layer indices, got 1"),
    (lambda: Schedule(8, "01", 4), "swa_layers must be an iterable of layer indices, got '01'"),
    (lambda: Schedule.from_skip_freq(2.0, 4, 8), r"window_attn_skip_freq must be an int or a list of 0/1, got 2\.0"),
    (lambda: Schedule.from_skip_freq(True, 4, 8), "window_attn_skip_freq must be an int or a list of 0/1, got True"),
    (lambda: Schedule.from_skip_freq([1, 0.0, 1, 0], 4, 8), r"window_attn_skip_freq\[1\] = 0\.0"),
    (lambda: Schedule.from_skip_freq([1, 0, True, 0], 4, 8), r"window_attn_skip_freq\[2\] = True"),
    (lambda: Schedule.from_skip_freq(2, 4.0, 8), r"num_layers must be an integer, got 4\.0"),
    (lambda: Schedule.from_skip_freq(2, 4, 8.5), r"window must be an integer, got 8\.5"),
    (lambda: Schedule.from_layer_types(["full_attention"], 8.0), r"window must be an integer, got 8\.0"),
    (lambda: Schedule.from_layer_types("full_attention", 8), "layer_types must be a list"),
])
def test_bools_and_floats_are_type_errors_naming_the_value(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_from_dict_names_a_missing_key_and_a_wrong_type():
    good = Schedule(8, [1], 4).to_dict()
    for key in good:
        with pytest.raises(ValueError, match=rf"missing key\(s\) \['{key}'\]"):
            Schedule.from_dict({k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['window', 'swa_layers', 'num_layers'\]"):
        Schedule.from_json("{}")
    with pytest.raises(TypeError, match=r"must be a mapping .* got \[8, \[1\], 4\]"):
        Schedule.from_json("[8, [1], 4]")
    with pytest.raises(TypeError, match="window must be an integer, got '8'"):
        Schedule.from_dict({**good, "window": "8"})
    with pytest.raises(TypeError, match="swa_layers must be an iterable of layer indices, got 1"):
        Schedule.from_dict({**good, "swa_layers": 1})
    with pytest.raises(TypeError, match=r"num_layers must be an integer, got 4\.0"):
        Schedule.from_json('{"window": 8, "swa_layers": [1], "num_layers": 4.0}')


# ------------------------------------------------------------------------ per-layer windows and sinks (§12)
def test_per_layer_windows_and_sinks_however_spelled_are_one_value():
    a = Schedule(128, [0, 1, 2], 4, windows={0: 64, 1: 64})
    b = Schedule.per_layer({0: 64, 1: 64, 2: 128}, 4)
    c = Schedule(64, [0, 1, 2], 4, windows={2: 128}, sinks={0: 0})
    assert a == b == c and len({a, b, c}) == 1
    assert a.windows == {0: 64, 1: 64, 2: 128} and a.sinks == {0: 0, 1: 0, 2: 0}
    assert [a.window_of(i) for i in (0, 1, 2)] == [64, 64, 128] and a.sinks_of(2) == 0
    assert not a.uniform and a != Schedule(64, [0, 1, 2], 4)
    # The same window for every layer, spelled per layer, is the single-window schedule.
    assert Schedule.per_layer({0: 32, 3: 32}, 4) == Schedule(32, [0, 3], 4) == Schedule(8, [0, 3], 4, windows={0: 32, 3: 32})
    assert Schedule(32, [0, 3], 4).uniform and Schedule.per_layer({}, 4).swa_layers == frozenset()
    s = Schedule.per_layer({1: (16, 4), 3: 16}, 4)
    assert s == Schedule(16, [1, 3], 4, sinks={1: 4}) and s.sinks_of(1) == 4 and s.sinks_of(3) == 0
    assert s.window == 16 and not s.uniform                   # one window, but sinks: not HF-expressible
    assert Schedule(16, [1, 3], 4, sinks=2).sinks == {1: 2, 3: 2}
    with pytest.raises(AttributeError):
        s.windows = {}


def test_window_of_differing_windows_is_asked_per_layer():
    s = Schedule.per_layer({0: 64, 2: 128}, 4)
    with pytest.raises(ValueError, match=r"different windows \{0: 64, 2: 128\}.*window_of\(layer\)"):
        s.window
    with pytest.raises(ValueError, match=r"window_of\(1\): layer 1 is a full-attention layer"):
        s.window_of(1)
    with pytest.raises(ValueError, match=r"sinks_of\(4\): layer index 4 is out of range for 4 layers"):
        s.sinks_of(4)
    with pytest.raises(TypeError, match="layer must be an integer, got True"):
        s.window_of(True)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: Schedule(8, [1], 4, windows={1: 0}), ValueError, r"windows\[1\] must be >= 1, got 0"),
    (lambda: Schedule(8, [1], 4, windows={2: 8}), ValueError, r"windows\[2\]: layer 2 is not an SWA layer"),
    (lambda: Schedule(8, [1], 4, windows={9: 8}), ValueError, "windows: layer index 9 is out of range for 4"),
    (lambda: Schedule(8, [1], 4, windows={1: 8.0}), TypeError, r"windows\[1\] must be an integer, got 8\.0"),
    (lambda: Schedule(8, [1], 4, windows={1: True}), TypeError, r"windows\[1\] must be an integer, got True"),
    (lambda: Schedule(8, [1], 4, windows={1.0: 8}), TypeError, r"windows: layer indices must be ints, got 1\.0"),
    (lambda: Schedule(8, [1], 4, windows=[8]), TypeError, r"windows must be a mapping \{layer: count\}, got \[8\]"),
    (lambda: Schedule(8, [1], 4, sinks=-1), ValueError, "sinks must be >= 0, got -1"),
    (lambda: Schedule(8, [1], 4, sinks=True), TypeError, "sinks must be an integer, got True"),
    (lambda: Schedule(8, [1], 4, sinks=2.0), TypeError, r"sinks must be an integer, got 2\.0"),
    (lambda: Schedule(8, [1], 4, sinks={1: -2}), ValueError, r"sinks\[1\] must be >= 0, got -2"),
    (lambda: Schedule(8, [1], 4, sinks={0: 2}), ValueError, r"sinks\[0\]: layer 0 is not an SWA layer"),
    (lambda: Schedule.per_layer({1: (8, 2, 3)}, 4), ValueError, r"layer 1: expected a window or a \(window, sinks\)"),
    (lambda: Schedule.per_layer({1: 0}, 4), ValueError, r"windows\[1\] must be >= 1, got 0"),
    (lambda: Schedule.per_layer({1: (8, 0.5)}, 4), TypeError, r"sinks\[1\] must be an integer, got 0\.5"),
    (lambda: Schedule.per_layer({4: 8}, 4), ValueError, "windows: layer index 4 is out of range for 4 layers"),
    (lambda: Schedule.per_layer([8, 8], 4), TypeError, r"per_layer takes a mapping"),
])
def test_bad_per_layer_values_name_the_value(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_numpy_per_layer_values_are_ints():
    np = pytest.importorskip("numpy")
    s = Schedule.per_layer({np.int64(1): (np.int32(16), np.int64(2)), 3: np.int64(8)}, np.int64(4))
    assert s == Schedule.per_layer({1: (16, 2), 3: 8}, 4)
    assert all(type(v) is int for d in (s.windows, s.sinks) for kv in d.items() for v in kv)
    assert Schedule.from_json(s.to_json()) == s


def test_per_layer_round_trip_json_repr_and_the_old_format():
    s = Schedule.per_layer({0: (64, 4), 2: 128, 5: 128}, 8)
    d = s.to_dict()
    assert d == {"window": 128, "swa_layers": [0, 2, 5], "num_layers": 8, "windows": {"0": 64}, "sinks": {"0": 4}}
    assert json.loads(s.to_json()) == d and Schedule.from_json(s.to_json()) == s and Schedule.from_dict(d) == s
    assert Schedule.from_dict({**d, "windows": {0: 64}, "sinks": {0: 4}}) == s     # int keys too
    assert eval(repr(s), {"Schedule": Schedule}) == s
    assert repr(s) == "Schedule(window=128, swa_layers=[0, 2, 5], num_layers=8, windows={0: 64}, sinks={0: 4})"
    assert str(s) == "Schedule(windows=64,128, sinks=0,4, 3/8 SWA layers: SFSFFSFF)"
    # A single-window schedule writes (and reads) exactly the old three keys: old files and uuids stay.
    old = {"window": 512, "swa_layers": [1, 3], "num_layers": 4}
    assert Schedule(512, [1, 3], 4).to_dict() == old and Schedule.from_dict(old) == Schedule(512, [1, 3], 4)
    assert repr(Schedule(512, [1, 3], 4)) == "Schedule(window=512, swa_layers=[1, 3], num_layers=4)"
    assert Schedule.from_dict({**old, "sinks": 2}) == Schedule(512, [1, 3], 4, sinks=2)
    with pytest.raises(ValueError, match=r"windows: layer key 'one' is not a layer index"):
        Schedule.from_dict({**old, "windows": {"one": 8}})
    with pytest.raises(ValueError, match=r"unknown schedule keys \['sink'\]"):
        Schedule.from_dict({**old, "sink": 2})


def test_a_pickled_single_window_schedule_still_loads():
    # A Schedule pickled before per-layer windows carried the fields window / swa_layers / num_layers.
    s = Schedule.__new__(Schedule)
    s.__setstate__({"window": 64, "swa_layers": frozenset({0, 2}), "num_layers": 4})
    assert s == Schedule(64, [0, 2], 4) and s.window_of(2) == 64
