"""Every subcommand of the ``swa-rewrite`` CLI on CPU (issue 8)."""

import json
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from swa_rewrite.cli import main


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_demo_runs_and_reports_everything(capsys):
    code, out, _ = run(["demo", "--prompt-lens", "9", "20", "--max-new-tokens", "4", "--cpu"], capsys)
    assert code == 0
    for expected in ("full -> SWA", "bytes/token", "graph diff", "structurally identical", "kv cache",
                     "agreement", "FP8 error only", "tokens"):
        assert expected in out, expected


def test_diff_prints_changed_and_unchanged_layers(capsys):
    code, out, _ = run(["diff", "--swa-layers", "1,3", "--window", "64"], capsys)
    assert code == 0
    assert "layer 1: 2 re-targeted" in out and "layer 3: 2 re-targeted" in out
    assert "unchanged layers 0, 2: structurally identical" in out
    assert "swa_attention" in out and "torch.uint8" in out
    code, out, _ = run(["diff", "--config", "v3-attn", "--layers", "8", "--skip-freq", "4", "--compact"], capsys)
    assert code == 0 and "unchanged layers 3, 7" in out and "~" not in out


def read_png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        chunks.setdefault(kind, []).append(body)
        pos += 12 + length
    assert b"IEND" in chunks and b"IDAT" in chunks
    width, height = struct.unpack(">II", chunks[b"IHDR"][0][:8])
    zlib.decompress(b"".join(chunks[b"IDAT"]))          # the image data inflates
    return width, height


def test_memory_table_and_png(tmp_path, capsys):
    png = tmp_path / "kv.png"
    code, out, _ = run(["memory", "--config", "v3-attn", "--contexts", "4096,32768", "--page-size", "64",
                        "--skip-freq", "2", "--window", "1024", "--plot", str(png)], capsys)
    assert code == 0
    # v3-attn dims: full layers 1152 B/token, SWA layers 656 B/token (4 layers, 2 SWA).
    assert "1152 -> 656" in out and "4608 -> 3616 bytes/token" in out
    # At 4K: 4096 x 4608 B original; 2 x 4096 x 1152 B full + 2 x 656 B x (ceil(1024 / 64) + 1) x 64 sliding
    # = 1.74x; unbounded, the bytes per token's 4608 / 3616 = 1.27x.
    assert "1.74x (1.27x)" in out and f"wrote {png}" in out
    assert read_png_size(png) == (900, 550)


def test_bench_fails_clearly_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: bench would run")
    code, _, err = run(["bench"], capsys)
    assert code == 2 and "bench needs a CUDA device" in err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--window", "0"], "must be >= 1, got 0"),
    (["memory", "--contexts", "4096,x"], "expected comma-separated integers"),
    (["diff", "--swa-layers", "7"], "layer index 7 is out of range for 4 layers"),
    (["diff", "--skip-freq-list", "1,0"], "2 entries for a model of 4 layers"),
    (["demo", "--config", "huge"], "invalid choice: 'huge'"),
    (["demo", "--cpu", "--num-blocks", "2", "--layers", "2"], "needs 14 blocks of 16 positions, the cache has 2"),
    (["memory", "--plot", "/nonexistent-dir/x.png"], "--plot /nonexistent-dir/x.png: cannot write the image"),
    (["diff", "--hf", "/nonexistent-dir", "--layers", "3"], "--layers applies to --config models"),
])
def test_bad_arguments_get_clear_messages(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_entry_points_and_help():
    out = subprocess.run([sys.executable, "-m", "swa_rewrite", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "memory" in out.stdout
    for sub in ("demo", "diff", "memory", "bench"):
        out = subprocess.run([sys.executable, "-m", "swa_rewrite", sub, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--window" in out.stdout, sub


def test_diff_and_memory_read_only_the_config_of_a_checkpoint(tmp_path, capsys):
    """--hf DIR for diff/memory needs config.json only (a 671B checkpoint's weights are never read)."""
    import json

    cfg = {"model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 96,
           "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
           "hidden_act": "silu", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code, out, err = run(["diff", "--hf", str(tmp_path), "--swa-layers", "0,2", "--compact"], capsys)
    assert code == 0, err
    assert "layer 0: 2 re-targeted" in out and "unchanged layers 1" in out
    code, out, err = run(["memory", "--hf", str(tmp_path), "--swa-layers", "1", "--plot", ""], capsys)
    assert code == 0, err
    assert "288 -> 164" in out      # bf16 [144] -> packed [164] bytes per token
    code, _, err = run(["diff", "--hf", str(tmp_path / "missing")], capsys)
    assert code == 2 and "cannot read" in err


@pytest.mark.parametrize("sub", ["diff", "memory", "demo"])
def test_a_checkpoint_that_is_not_deepseek_gets_a_clear_message(sub, tmp_path, capsys):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    code, _, err = run([sub, "--hf", str(tmp_path)] + (["--plot", ""] if sub == "memory" else []), capsys)
    assert code == 2 and "not a DeepSeek-V2/V3 config" in err


# ------------------------------------------------------------------------------------------ issue 12
def test_version_and_help_state_the_real_defaults(capsys):
    from swa_rewrite import __version__
    from swa_rewrite.cli import DEFAULT_CONFIG, DEFAULT_WINDOW, DEMO_CONFIG, build_parser

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"swa-rewrite {__version__}"
    parser = build_parser()
    for sub in ("demo", "diff", "memory", "bench"):
        args = parser.parse_args([sub])
        config = DEMO_CONFIG if sub == "demo" else DEFAULT_CONFIG      # the demo shows the trained model
        assert (args.config, args.window) == (config, DEFAULT_WINDOW), sub
        with pytest.raises(SystemExit):
            parser.parse_args([sub, "--help"])
        text = " ".join(capsys.readouterr().out.split())       # argparse wraps lines
        assert f"SWA window W in tokens (default: {DEFAULT_WINDOW})" in text, sub
        assert f"(default: {config})" in text and "(default: None)" not in text, sub
        assert "every n-th layer stays full (default: 2)" in text, sub


def test_memory_writes_a_plot_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["memory"], capsys)
    assert code == 0 and "wrote" not in out and list(tmp_path.iterdir()) == []


def test_memory_json(tmp_path, capsys):
    png = tmp_path / "kv.png"
    code, out, _ = run(["memory", "--config", "v3-attn", "--layers", "61", "--skip-freq", "4", "--window", "4096",
                        "--contexts", "4096,131072", "--json", "--plot", str(png)], capsys)
    report = json.loads(out)
    assert code == 0 and report["plot"] == str(png) and png.exists()
    assert report["report"]["schedule"] == {"window": 4096, "swa_layers": [i for i in range(61) if (i + 1) % 4],
                                            "num_layers": 61}
    assert report["report"]["bytes_per_token"] == {"full": 61 * 1152, "rewritten": 15 * 1152 + 46 * 656}
    assert len(report["report"]["layers"]) == 61
    assert report["report"]["layers"][0]["cache_after"] == {"dtype": "uint8", "width": 656, "bytes_per_token": 656}
    big = report["contexts"][1]
    assert big["context"] == 131072 and big["original_bytes"] == 131072 * 61 * 1152
    assert big["unbounded_bytes"] == 131072 * (15 * 1152 + 46 * 656)
    assert big["saved_bytes"] == big["original_bytes"] - big["rewritten_bytes"]
    # Window-bounded: 46 sliding layers keep ceil(4096 / 64) + 1 = 65 blocks of 64 positions.
    assert big["rewritten_bytes"] == 131072 * 15 * 1152 + 46 * 656 * 65 * 64
    assert big["bytes_ratio"] == pytest.approx(3.85, abs=0.005)


def test_diff_json(capsys):
    code, out, _ = run(["diff", "--swa-layers", "1,3", "--json"], capsys)
    diff = json.loads(out)
    assert code == 0 and diff["schedule"]["swa_layers"] == [1, 3]
    assert diff["forward"]["changed_layers"] == [1, 3] and diff["cache_allocation"]["changed_layers"] == [1, 3]
    # The step check outside the layers now checks two cache groups (full layers 0, 2; sliding 1, 3).
    assert diff["forward"]["outside_layers_changed"] and not diff["cache_allocation"]["outside_layers_changed"]
    layer1 = next(d for d in diff["forward"]["layers"] if d["layer"] == 1)
    assert len(layer1["retargeted"]) == 2 and layer1["same_dataflow"]
    assert all(d["isomorphic"] for d in diff["forward"]["layers"] if d["layer"] in (0, 2))


def test_demo_json(capsys):
    code, out, _ = run(["demo", "--config", "tiny", "--prompt-lens", "9", "20", "--max-new-tokens", "4", "--cpu",
                        "--window", "8", "--json"], capsys)
    demo = json.loads(out)
    assert code == 0 and demo["model"]["name"] == "tiny" and demo["report"]["schedule"]["window"] == 8
    assert [p["length"] for p in demo["prompts"]] == [9, 20] and all(len(p["rewritten"]) == 4 for p in demo["prompts"])
    assert demo["kv_cache_bytes"]["rewritten"] < demo["kv_cache_bytes"]["original"]
    windowed, fp8_only = demo["agreement"]
    assert windowed["window"] == 8 and fp8_only["window"] == 24 and fp8_only["tokens"] == 8
    assert 0 <= fp8_only["logits_relative_difference"] < 0.1
    assert demo["graph_diff"]["changed_layers"] == [0, 2]


def test_bench_module_does_not_import_the_cli():
    """No circle: the CLI builds the model and schedule and hands them to bench.run_bench."""
    code = "import sys, swa_rewrite.bench; assert 'swa_rewrite.cli' not in sys.modules, 'bench imported the cli'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
