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
