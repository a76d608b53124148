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
