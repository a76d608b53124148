"""The training script: a smoke run writes a loadable checkpoint and a loss log, repeatably for its seed; the paged
engine on the smoke-trained checkpoint equals the dense forward it was trained through."""

import json

import pytest
import torch

from swa_rewrite.models import from_pretrained
from swa_rewrite.reference import REFERENCE_CONFIG
from swa_rewrite.reference.train import bucket_edges, bucket_names, lr_at, main, parse_args, TrainArgs
from test_reference_model import assert_engine_matches_dense, heldout_tokens


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    assert main(["--smoke", "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_checkpoint_and_log(smoke_checkpoint):
    files = sorted(p.name for p in smoke_checkpoint.iterdir())
    assert files == ["config.json", "model.safetensors", "train_log.json"]
    model = from_pretrained(smoke_checkpoint)
    assert model.config == REFERENCE_CONFIG and model.lm_head.weight.dtype == torch.bfloat16
    log = json.loads((smoke_checkpoint / "train_log.json").read_text())
    assert log["steps_done"] == 6 and log["stopped_by"] == "steps" and log["parameters"] < 8e6
    assert [row["step"] for row in log["curves"]] == [1, 3, 6]
    assert all(len(row["heldout_buckets"]) == 2 for row in log["curves"])
    assert set(log["final_heldout"]["buckets"]) == {"0-128", "128-160"}
    assert log["curves"][-1]["train_loss"] < log["curves"][0]["train_loss"]


def test_smoke_run_is_repeatable_for_its_seed(smoke_checkpoint, tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model.safetensors").read_bytes() == (smoke_checkpoint / "model.safetensors").read_bytes()


def test_paged_engine_equals_dense_forward_on_the_smoke_checkpoint(smoke_checkpoint):
    model = from_pretrained(smoke_checkpoint, dtype=torch.float32)
    assert_engine_matches_dense(model, heldout_tokens(150), rel_dense=1e-5, rel_float64=1e-5)


def test_schedule_and_buckets():
    args = TrainArgs(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(args, 0, 0.0) == pytest.approx(0.1) and lr_at(args, 9, 0.09) < 1.0
    assert lr_at(args, 50, 0.5) == pytest.approx(0.55) and lr_at(args, 99, 1.0) == pytest.approx(0.1)
    assert lr_at(args, 10, 2.0) == pytest.approx(0.1)        # a time limit overrun stays at the floor
    assert bucket_edges(4096) == [0, 128, 512, 2048, 4096] and bucket_edges(300) == [0, 128, 300]
    assert bucket_names(2048) == ["0-128", "128-512", "512-2048"]


def test_smoke_defaults_yield_to_explicit_options():
    args = parse_args(["--smoke", "--steps", "2"])
    assert args.steps == 2 and args.batch == 2 and args.device == "cpu"
    assert parse_args([]).seq_len == TrainArgs().seq_len


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_key_values_are_stated_then_repeated_and_nothing_else_changes(seed):
    from swa_rewrite.reference.train import add_key_values

    gen = torch.Generator().manual_seed(seed)
    original = torch.randint(0, 256, (16, 700), generator=torch.Generator().manual_seed(100 + seed))
    windows = add_key_values(original.clone(), gen, 0.5)
    changed_rows = (windows != original).any(1).nonzero().flatten().tolist()
    assert 2 <= len(changed_rows) <= 14
    for b in changed_rows:
        text = bytes(windows[b].tolist()).decode("latin-1")
        found = 0
        for start in [i for i in range(len(text)) if text.startswith("\n", i)]:
            end = text.find('"\n', start + 1)
            stmt = text[start:end + 2] if end > 0 else ""
            name, sep, value = stmt[1:-2].partition(' = "')
            if sep and name.split("_")[0] in ("key", "passkey", "token", "secret", "value", "id", "code", "tag") \
                    and 6 <= len(value) <= 10 and value.isalnum() and text.find(stmt, end) > 0:
                found += 1
        assert found >= 1, text
        diff = (windows[b] != original[b]).nonzero().flatten()
        assert diff.numel() <= 3 * 2 * 30             # at most three statements and their repeats
    untouched = [b for b in range(16) if b not in changed_rows]
    assert torch.equal(windows[untouched], original[untouched])
    assert torch.equal(add_key_values(original.clone(), gen, 0.0), original)


def test_key_value_distances_span_short_and_long():
    from swa_rewrite.reference.train import add_key_values

    gen = torch.Generator().manual_seed(0)
    distances = []
    for _ in range(40):
        w = torch.zeros(1, 4096, dtype=torch.long)
        add_key_values(w, gen, 1.0)
        nz = (w[0] == ord("\n")).nonzero().flatten().tolist()
        distances.append(nz[-1] - nz[0])
    assert min(distances) < 300 and max(distances) > 2000
