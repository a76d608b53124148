"""The memory report of issue 13: one request's KV cache per cache group, window-bounded and unbounded, the
capacity ratio, original vs rewritten (``RewriteReport.memory`` / ``render_memory``, ``swa-rewrite memory``).

Expected numbers are worked out by hand here (layers x bytes per token x positions; pages counted from the
window), not with ``ops.kv_cache_spec``."""

import json

import pytest
import torch

from swa_rewrite import Schedule
from swa_rewrite.cli import main, plot_memory
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.rewrite import apply

GiB = 2**30

# A small DeepSeek-V3 checkpoint config (config.json only): R = 128, P = 16, 3 layers. In bfloat16 a full
# layer's row is (128 + 16) x 2 = 288 bytes; the packed FP8 row is R + 4R/128 + 2P = 128 + 4 + 32 = 164 bytes.
HF_CONFIG = {"model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
             "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 96,
             "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
             "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
             "hidden_act": "silu", "tie_word_embeddings": False}
FULL_ROW, PACKED_ROW = 288, 164


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    return tmp_path


def test_hf_config_per_group_bytes_by_hand(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(["memory", "--hf", str(checkpoint), "--swa-layers", "0,2", "--window", "100",
                          "--page-size", "16", "--contexts", "40,1000", "--budget", "1", "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["plot"] is None and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert (report["page_size"], report["chunk"], report["budget_bytes"]) == (16, 1, GiB)
    short, long = report["contexts"]
    # 1000 tokens take 63 pages of 16 = 1008 positions; 40 tokens 3 pages = 48 positions.
    assert long["original_bytes"] == 3 * FULL_ROW * 1008
    full, sliding = long["groups"]
    assert (full["group"], full["kind"], full["window"], full["sinks"], full["layers"]) == (0, "full", None, 0, [1])
    assert (sliding["group"], sliding["kind"], sliding["window"], sliding["sinks"], sliding["layers"]) == \
        (1, "sliding", 100, 0, [0, 2])
    assert (full["bytes_per_token"], sliding["bytes_per_token"]) == (FULL_ROW, PACKED_ROW)
    assert full["bytes"] == full["unbounded_bytes"] == 1 * FULL_ROW * 1008 and full["blocks"] == 63
    # Decode at 1000 tokens, W = 100: the step's window spans W - 1 + 1 = 100 positions; bounded, a layer holds
    # ceil(100 / 16) + 1 = 8 blocks (7 pages plus the one a misaligned window straddles).
    assert (sliding["blocks"], sliding["unbounded_blocks"]) == (8, 63)
    assert sliding["bytes"] == 2 * PACKED_ROW * 8 * 16
    assert sliding["unbounded_bytes"] == 2 * PACKED_ROW * 1008
    assert long["rewritten_bytes"] == FULL_ROW * 1008 + 2 * PACKED_ROW * 8 * 16
    assert long["unbounded_bytes"] == FULL_ROW * 1008 + 2 * PACKED_ROW * 1008
    assert long["saved_bytes"] == long["original_bytes"] - long["rewritten_bytes"]
    assert long["bytes_ratio"] == pytest.approx(3 * 288 * 1008 / (288 * 1008 + 2 * 164 * 128))
    assert long["unbounded_bytes_ratio"] == pytest.approx(3 * 288 / (288 + 2 * 164))
    requests = {"original": GiB // (3 * 288 * 1008), "rewritten": GiB // (288 * 1008 + 2 * 164 * 128),
                "unbounded": GiB // (288 * 1008 + 2 * 164 * 1008)}
    assert long["requests"] == requests
    assert long["capacity_ratio"] == pytest.approx(requests["rewritten"] / requests["original"])
    assert long["unbounded_capacity_ratio"] == pytest.approx(requests["unbounded"] / requests["original"])
    # 40 tokens are 3 pages, fewer than the window's 8 blocks: bounded holds what unbounded does.
    assert [g["blocks"] for g in short["groups"]] == [3, 3]
    assert short["rewritten_bytes"] == short["unbounded_bytes"] == (288 + 2 * 164) * 48


def test_json_keys(checkpoint, capsys):
    code, out, _ = run(["memory", "--hf", str(checkpoint), "--swa-layers", "1", "--contexts", "64", "--json"], capsys)
    report = json.loads(out)
    assert code == 0
    assert set(report) == {"model", "page_size", "chunk", "budget_bytes", "report", "contexts", "plot"}
    assert (report["page_size"], report["budget_bytes"]) == (64, 60 * GiB)     # the defaults
    (ctx,) = report["contexts"]
    assert set(ctx) == {"context", "original_bytes", "rewritten_bytes", "unbounded_bytes", "saved_bytes",
                        "bytes_ratio", "unbounded_bytes_ratio", "requests", "capacity_ratio",
                        "unbounded_capacity_ratio", "groups"}
    assert set(ctx["requests"]) == {"original", "rewritten", "unbounded"}
    assert all(set(g) == {"group", "kind", "window", "sinks", "layers", "bytes_per_token", "blocks", "bytes",
                          "unbounded_blocks", "unbounded_bytes"} for g in ctx["groups"])


def test_chunk_and_sinks_by_hand(capsys):
    """A prefill chunk widens the window's span; sink blocks stay for the request's life."""
    model = MLAModel(MLAConfig(), device="meta", dtype=torch.bfloat16)       # tiny: 4 layers, R 128, P 16
    report = apply(model, Schedule.per_layer({0: (64, 20), 2: 64}, 4)).swa_report
    mem = report.memory(1000, 16, chunk=17, budget=GiB)
    groups = {(g.kind, g.window, g.sinks): g for g in mem.groups}
    assert groups[("full", None, 0)].layers == (1, 3)
    # W - 1 + C = 64 - 1 + 17 = 80 positions: ceil(80 / 16) + 1 = 6 blocks, plus ceil(20 / 16) = 2 sink blocks.
    assert groups[("sliding", 64, 0)].blocks == 6 and groups[("sliding", 64, 0)].layers == (2,)
    assert groups[("sliding", 64, 20)].blocks == 6 + 2 and groups[("sliding", 64, 20)].layers == (0,)
    assert mem.rewritten_bytes == 2 * FULL_ROW * 1008 + PACKED_ROW * 16 * (6 + 8)
    assert mem.original_bytes == 4 * FULL_ROW * 1008
    # The same through the CLI for a uniform schedule.
    code, out, _ = run(["memory", "--swa-layers", "0,2", "--window", "64", "--page-size", "16", "--chunk", "17",
                        "--contexts", "1000", "--json"], capsys)
    (ctx,) = json.loads(out)["contexts"]
    assert code == 0 and ctx["groups"][1]["blocks"] == 6
    assert ctx["rewritten_bytes"] == 2 * FULL_ROW * 1008 + 2 * PACKED_ROW * 6 * 16


def test_deepseek_v3_capacity_ratio(tmp_path, capsys):
    """DeepSeek-V3 (61 layers, R 512, P 64: 1152 B/token full in bf16, 656 packed), window_attn_skip_freq = 4
    (46 SWA layers), W = 4096, page 64: ~3.33x at 32K and ~3.85x at 128K; 1.48x when every position stays."""
    png = tmp_path / "v3.png"
    code, out, _ = run(["memory", "--config", "v3-attn", "--layers", "61", "--skip-freq", "4", "--window", "4096",
                        "--contexts", "32768,131072", "--plot", str(png)], capsys)
    assert code == 0 and png.exists()
    sliding = 46 * 656 * (4096 // 64 + 1) * 64         # ceil((4096 - 1 + 1) / 64) + 1 = 65 blocks per layer
    for ctx, ratio in ((32768, 3.33), (131072, 3.85)):
        original, rewritten = 61 * 1152 * ctx, 15 * 1152 * ctx + sliding
        assert original / rewritten == pytest.approx(ratio, abs=0.005)
        row = next(line.split() for line in out.splitlines() if line.split()[:1] == [str(ctx)])
        assert f"{ratio:.2f}x" in row and "(1.48x)" in row, row
        requests = f"{60 * GiB // original} / {60 * GiB // rewritten}"
        assert requests in " ".join(row), row
    assert "8.6 GiB" in out and "2.2 GiB" in out                 # at 128K: 8.58 GiB -> 2.23 GiB
    # Readable for 61 layers: the groups in a few lines, each under 130 characters.
    section = out[out.index("KV cache of one request"):out.index("wrote")].splitlines()
    assert len(section) < 16 and max(map(len, section)) <= 120
    assert "saved at" not in out        # the unbounded "GiB saved" line of the per-layer table is left out


def test_plot_marks_each_distinct_window(tmp_path, monkeypatch):
    import matplotlib.axes

    marked = []
    original = matplotlib.axes.Axes.axvline
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda ax, x=0, *a, **k: (marked.append(x),
                                                                                     original(ax, x, *a, **k))[1])
    model = MLAModel(MLAConfig(), device="meta", dtype=torch.bfloat16)
    report = apply(model, Schedule.per_layer({0: 64, 1: 1000, 2: 64}, 4)).swa_report
    png = tmp_path / "kv.png"
    plot_memory(report, [100, 8192], 16, str(png), "per-layer windows")
    assert sorted(marked) == [64, 1000] and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,message", [
    (["memory", "--budget", "0"], "must be a positive number, got 0"),
    (["memory", "--budget", "x"], "expected a number, got 'x'"),
    (["memory", "--chunk", "0"], "must be >= 1, got 0"),
])
def test_bad_budget_and_chunk(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
