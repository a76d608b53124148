"""Every CLI error is one line on stderr and exit code 2, never a traceback (issue 11).

Most cases call ``main`` in-process (an exception escaping it fails the test as a traceback would); a few run
``python -m swa_rewrite`` to check what a user sees end to end.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import swa_rewrite.cli as cli
from swa_rewrite.cli import main

# A small DeepSeek-V3 config.json (the weights each test writes are beside the point: loading fails first).
CONFIG = {"model_type": "deepseek_v3", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 96,
          "kv_lora_rank": 128, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
          "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
          "hidden_act": "silu", "tie_word_embeddings": False}


def run_failing(argv, capsys):
    """``main(argv)``'s exit code and its stderr lines (argparse errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.splitlines()


def assert_one_line_error(code, lines, *fragments):
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and "error: " in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("argv,fragments", [
    # argparse errors: one line, without the usage block
    (["demo", "--num-blocks", "1e8"], ["argument --num-blocks: expected an integer, got '1e8'"]),
    (["demo", "--page-size", "2.5"], ["argument --page-size: expected an integer, got '2.5'"]),
    (["demo", "--seed", "x"], ["argument --seed: expected an integer, got 'x'"]),
    (["demo", "--seed", str(10**30)], ["argument --seed: must be a 64-bit integer"]),
    (["memory", "--contexts", ","], ["--contexts must be positive integers, got []"]),
    (["bench", "--contexts", "5,x"], ["expected comma-separated integers, got '5,x'"]),
    ([], ["the following arguments are required"]),
    (["nope"], ["invalid choice: 'nope'"]),
    (["demo", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["diff", "--swa-layers", "1", "--skip-freq", "2"], ["not allowed with argument"]),
    # sizes refused before anything is allocated
    (["demo", "--cpu", "--num-blocks", str(10**12)], ["--num-blocks 1000000000000", "more than the", "available"]),
    (["demo", "--cpu", "--num-blocks", "2", "--page-size", str(10**11), "--prompt-lens", "3"],
     ["--page-size 100000000000", "more than the"]),
    (["demo", "--cpu", "--layers", "100000"], ["--layers 100000: at most 1024 layers are supported"]),
    (["diff", "--layers", "5000"], ["--layers 5000: at most 1024 layers"]),
    (["demo", "--cpu", "--prompt-lens", "100000000"], ["prompt 0 needs 6250001 blocks of 16 positions"]),
    (["demo", "--cpu", "--max-new-tokens", str(10**9)], ["needs 62500013 blocks"]),
    # paths
    (["diff", "--hf", "/nonexistent-dir"], ["--hf /nonexistent-dir: cannot read the checkpoint"]),
    (["memory", "--hf", os.devnull, "--plot", ""], ["is not a directory"]),
])
def test_bad_arguments_are_one_line(argv, fragments, capsys):
    assert_one_line_error(*run_failing(argv, capsys), *fragments)


def _write(path, files):
    path.mkdir(exist_ok=True)
    for name, content in files.items():
        (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _safetensors(tensors):
    from safetensors.torch import save

    return save(tensors)


CHECKPOINTS = {
    "config-a-list": ({"config.json": "[1, 2]"}, ["expected a JSON object of config keys, got a JSON list"]),
    "config-not-json": ({"config.json": "{oops"}, ["config.json: not a valid JSON config.json"]),
    "config-bad-type": ({"config.json": json.dumps({**CONFIG, "hidden_size": "256"})},
                        ["config hidden_size='256' must be an integer"]),
    "config-huge": ({"config.json": json.dumps({**CONFIG, "num_hidden_layers": 10**6})},
                    ["num_hidden_layers=1000000; at most 1024 layers"]),
}
WEIGHTS = {
    "two-unindexed-files": ({"a.safetensors": "t", "b.safetensors": "t"},
                            ["2 *.safetensors files ['a.safetensors', 'b.safetensors']"]),
    "corrupt-shard": ({"model.safetensors": b"\x00" * 5}, ["model.safetensors: not a readable safetensors file"]),
    "empty-shard": ({"model.safetensors": b""}, ["model.safetensors: not a readable safetensors file"]),
    "index-without-weight-map": ({"model.safetensors.index.json": "{}", "model-1.safetensors": "t"},
                                 ["model.safetensors.index.json: expected a JSON object with a 'weight_map'"]),
    "no-weights": ({}, ["no *.safetensors file"]),
    "mismatched-tensors": ({"model.safetensors": "t"}, ["checkpoint does not match the config's model; missing"]),
}


@pytest.mark.parametrize("sub", ["diff", "memory", "demo"])
@pytest.mark.parametrize("case", sorted(CHECKPOINTS))
def test_a_bad_config_is_one_line(sub, case, tmp_path, capsys):
    files, fragments = CHECKPOINTS[case]
    path = _write(tmp_path / "ckpt", files)
    argv = [sub, "--hf", str(path)] + {"memory": ["--plot", ""], "demo": ["--cpu"]}.get(sub, [])
    assert_one_line_error(*run_failing(argv, capsys), f"--hf {path}", *fragments)


@pytest.mark.parametrize("case", sorted(WEIGHTS))
def test_bad_weights_are_one_line(case, tmp_path, capsys):
    files, fragments = WEIGHTS[case]
    tensor = _safetensors({"model.norm.weight": torch.ones(256)})
    files = {name: tensor if content == "t" else content for name, content in files.items()}
    path = _write(tmp_path / "ckpt", {"config.json": json.dumps(CONFIG), **files})
    assert_one_line_error(*run_failing(["demo", "--cpu", "--hf", str(path)], capsys), f"--hf {path}", *fragments)


def test_running_out_of_memory_is_one_line_and_other_failures_keep_their_traceback(monkeypatch, capsys):
    def fail_with(error):
        def build(*args, **kwargs):
            raise error
        monkeypatch.setattr(cli, "_build_model", build)

    fail_with(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore detail"))
    assert_one_line_error(*run_failing(["diff"], capsys), "out of memory: CUDA out of memory", "; more detail")
    fail_with(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"))
    assert_one_line_error(*run_failing(["diff"], capsys), "out of memory")
    fail_with(RuntimeError("an internal bug"))
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["diff"])


def test_the_process_prints_one_line_and_exits_2(tmp_path):
    """What a user sees: ``python -m swa_rewrite`` with an argument error, an absurd size, a corrupt shard."""
    path = _write(tmp_path / "ckpt", {"config.json": json.dumps(CONFIG), "model.safetensors": b"junk"})
    for argv, fragment in ((["demo", "--num-blocks", "1e8"], "expected an integer, got '1e8'"),
                           (["demo", "--cpu", "--num-blocks", str(10**12)], "more than the"),
                           (["demo", "--cpu", "--hf", str(path)], "not a readable safetensors file")):
        out = subprocess.run([sys.executable, "-m", "swa_rewrite", *argv], capture_output=True, text=True,
                             env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
        lines = out.stderr.splitlines()
        assert out.returncode == 2, (argv, out.stderr)
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in out.stderr, (argv, out.stderr)
