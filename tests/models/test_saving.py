"""``save_pretrained`` / ``from_pretrained`` keep a rewritten model whole (issue 12): DeepSeek checkpoint names
and config keys, the schedule under the ``swa_rewrite`` key, and the rewritten module back on load."""

import json
import sys

import pytest
import torch

import swa_rewrite
from swa_rewrite import Schedule
from swa_rewrite.models import MLAConfig, MLAModel, from_pretrained, save_pretrained
from swa_rewrite.runtime import Engine

pytest.importorskip("safetensors")

# V3 routing (sigmoid, noaux_tc) so the saved config is one transformers builds; R = 128 for the FP8 cache.
CONFIG = MLAConfig.named("tiny").replace(
    num_hidden_layers=3, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
    first_k_dense_replace=1, n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
    norm_topk_prob=True, routed_scaling_factor=2.5)
SCHEDULE = Schedule(window=5, swa_layers=[0, 2], num_layers=3)
TOKENS = [(7 * i + 3) % CONFIG.vocab_size for i in range(29)]


def engine_logits(model):
    return Engine(model, num_blocks=8, page_size=16, max_tokens_per_step=11).logits(TOKENS)


def swa_targets(module):
    return {str(n.target) for n in module.graph.nodes if n.op == "call_function"}


def test_rewritten_model_round_trips(tmp_path, seed, monkeypatch):
    swa = swa_rewrite.apply(MLAModel(CONFIG, seed=seed), SCHEDULE)
    swa_rewrite.save_pretrained(swa, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    monkeypatch.setitem(sys.modules, "transformers", None)   # loading must not need transformers
    loaded = swa_rewrite.from_pretrained(tmp_path)
    assert isinstance(loaded, swa_rewrite.SWAModule) and loaded.swa_schedule == SCHEDULE
    assert loaded.config == CONFIG
    assert "swa_rewrite.swa_attention.default" in swa_targets(loaded)
    assert loaded.swa_report.rows == swa.swa_report.rows
    torch.testing.assert_close(engine_logits(loaded), engine_logits(swa), rtol=0, atol=0)


def test_config_json_carries_the_schedule_in_both_spellings(tmp_path, seed):
    save_pretrained(swa_rewrite.apply(MLAModel(CONFIG, seed=seed), SCHEDULE), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["swa_rewrite"] == {"version": 1, "schedule": SCHEDULE.to_dict()}
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert cfg["sliding_window"] == 5 and Schedule.from_hf_config(cfg) == SCHEDULE
    assert cfg["model_type"] == "deepseek_v3" and cfg["dtype"] == "float32"


def test_plain_model_round_trips_unrewritten(tmp_path, seed):
    model = MLAModel(MLAConfig.named("tiny"), seed=seed)     # dense MLP, softmax defaults: no MoE keys used
    save_pretrained(model, tmp_path)
    assert "swa_rewrite" not in json.loads((tmp_path / "config.json").read_text())
    loaded = from_pretrained(tmp_path)
    assert type(loaded) is MLAModel and loaded.config == model.config
    torch.testing.assert_close(engine_logits(loaded), engine_logits(model), rtol=0, atol=0)


def test_transformers_reads_the_saved_weights(tmp_path, seed):
    """The folder is a DeepSeek-V3 checkpoint to transformers too: its model computes our unrewritten logits."""
    transformers = pytest.importorskip("transformers")
    model = MLAModel(CONFIG, seed=seed)
    save_pretrained(swa_rewrite.apply(model, SCHEDULE), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(engine_logits(model), theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("entry, match", [
    ({"version": 2, "schedule": SCHEDULE.to_dict()}, r"swa_rewrite.version=2 is not supported"),
    ({"schedule": SCHEDULE.to_dict()}, r"swa_rewrite.version=None"),
    ({"version": 1}, r"must be an object with 'version' and 'schedule'"),
    ({"version": 1, "schedule": {"window": 5, "swa_layers": [0]}}, r"swa_rewrite.schedule: .*missing key"),
])
def test_bad_saved_schedule_is_named(tmp_path, seed, entry, match):
    save_pretrained(swa_rewrite.apply(MLAModel(CONFIG, seed=seed), SCHEDULE), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["swa_rewrite"] = entry
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as info:
        from_pretrained(tmp_path)
    assert "config.json" in str(info.value)


def test_save_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(TypeError, match="save_pretrained takes an MLAModel.*got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match="meta device"):
        save_pretrained(MLAModel(CONFIG, device="meta"), tmp_path)
    softmax_normalised = CONFIG.replace(scoring_func="softmax", topk_method="greedy", norm_topk_prob=True)
    with pytest.raises(ValueError, match="neither DeepSeek-V3's .* nor DeepSeek-V2's"):
        save_pretrained(MLAModel(softmax_normalised, seed=0), tmp_path)


PER_LAYER = Schedule.per_layer({0: 5, 2: 9}, 3)


def test_per_layer_windows_round_trip_and_keep_hf_sliding_window_out(tmp_path, seed, monkeypatch):
    swa = swa_rewrite.apply(MLAModel(CONFIG, seed=seed), PER_LAYER)
    save_pretrained(swa, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["swa_rewrite"]["schedule"] == {"window": 9, "swa_layers": [0, 2], "num_layers": 3, "windows": {"0": 5}}
    # Which layers slide is still said the Hugging Face way; one sliding_window cannot say two windows.
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert "sliding_window" not in cfg
    with pytest.raises(ValueError, match="no sliding_window .*under 'swa_rewrite'"):
        Schedule.from_hf_config(cfg)
    monkeypatch.setitem(sys.modules, "transformers", None)
    loaded = from_pretrained(tmp_path)
    assert loaded.swa_schedule == PER_LAYER and loaded.swa_schedule.window_of(0) == 5
    assert [(r.layer, r.window) for r in loaded.swa_report.rows] == [(0, 5), (1, None), (2, 9)]
    torch.testing.assert_close(engine_logits(loaded), engine_logits(swa), rtol=0, atol=0)


def test_hf_keys_say_sliding_window_only_for_one_window_and_no_sinks():
    from swa_rewrite.models.saving import hf_schedule_keys, saved_schedule
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    assert hf_schedule_keys(SCHEDULE) == {"layer_types": types, "sliding_window": 5}
    assert hf_schedule_keys(PER_LAYER) == {"layer_types": types}
    sinks = Schedule(5, [0, 2], 3, sinks={2: 4})
    assert hf_schedule_keys(sinks) == {"layer_types": types}
    # The saved key carries sinks.
    cfg = {"swa_rewrite": {"version": 1, "schedule": json.loads(sinks.to_json())}}
    assert saved_schedule(cfg) == sinks and saved_schedule(cfg).sinks_of(2) == 4


SINKS = Schedule.per_layer({0: 5, 2: (6, 4)}, 3)


def sinks_args(module):
    """layer → the ``sinks`` argument of each SWA attention node (0 where the node leaves it to the default)."""
    out = {}
    for n in module.graph.nodes:
        if n.op == "call_function" and "swa_attention" in str(n.target):
            args = {**dict(zip([a.name for a in n.target._schema.arguments], n.args)), **n.kwargs}
            out[args["layer"]] = args.get("sinks", 0)
    return out


def test_sinks_round_trip(tmp_path, seed, monkeypatch):
    model = MLAModel(CONFIG, seed=seed)
    swa = swa_rewrite.apply(model, SINKS)
    assert sinks_args(swa) == {0: 0, 2: 4}
    save_pretrained(swa, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["swa_rewrite"]["schedule"] == SINKS.to_dict() and cfg["swa_rewrite"]["schedule"]["sinks"] == {"2": 4}
    assert cfg["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert "sliding_window" not in cfg            # HF's sliding_window has no sinks
    monkeypatch.setitem(sys.modules, "transformers", None)
    loaded = from_pretrained(tmp_path)
    assert loaded.swa_schedule == SINKS and loaded.swa_schedule.sinks_of(2) == 4 and sinks_args(loaded) == {0: 0, 2: 4}
    assert [(r.layer, r.window, r.sinks) for r in loaded.swa_report.rows] == [(0, 5, 0), (1, None, None), (2, 6, 4)]
    assert "sinks" in loaded.swa_report.render().splitlines()[1]
    got = engine_logits(loaded)
    torch.testing.assert_close(got, engine_logits(swa), rtol=0, atol=0)
    # The sinks came back, not only the windows: the same windows without sinks give other logits.
    without = engine_logits(swa_rewrite.apply(model, Schedule.per_layer({0: 5, 2: 6}, 3)))
    assert (got - without).abs().max() > 1e-3 * got.abs().max()
