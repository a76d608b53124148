"""The key-ring protocol of the Gluon MHA kernel's ``reuse`` variant (``kernels/gluon_mha.py``), through its model
``benchmarks/mha_reuse_protocol_model.py``: random ragged steps and interleavings stay deadlock-free and every tile
read holds the rows its item expects; at W = 128 consecutive query tiles share half their key tiles; the launch
rule enables sharing exactly where the ring can hold the shared tiles."""

import importlib.util
import pathlib

import pytest

from swa_rewrite.kernels.gluon_mha import reuses_key_tiles

MODEL = pathlib.Path(__file__).parents[2] / "benchmarks" / "mha_reuse_protocol_model.py"


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("mha_reuse_protocol_model", MODEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_random_steps_and_interleavings_are_clean(model, seed):
    for s in range(seed, seed + 150):
        errors, cfg = model.run(s)
        assert not errors, (cfg, errors[:3])


def _loads_per_item(model, dec, chunk, window, nbuf, reuse):
    class One(model.Step):
        def __init__(self):
            self.window, self.sinks, self.Hg = window, 0, 4
            self.dec, self.cu = [dec], [0, chunk]
            self.kv_cu = [0, dec + chunk - max(dec - window + 1, 0)]
            tiles = model.cdiv(chunk, model.BLOCK_M)
            self.tile_b, self.tile_cu = [0] * tiles, [0, tiles]
            self.n_tiles_all, self.total = tiles, tiles * 4

    model.REUSE_NOW[0] = reuse
    step, loads = One(), 0
    for pid in range(3):
        start = loaded = 0
        n_local = model.local_items(pid, 3, step.total, reuse)
        for j in range(n_local):
            it = step.item(model.item_of(pid, 3, j, step.total, reuse))
            n = it["n_st"] + it["n_wt"]
            loads += n - (loaded - start)
            loaded = start + n
            start += model.shift(pid, 3, j, n_local, step.total, it, n, step, nbuf, reuse)
    return loads / step.total


@pytest.mark.parametrize("dec", [0, 4096])
def test_reuse_halves_the_key_tiles_at_w128(model, dec):
    plain = _loads_per_item(model, dec, 4096, 128, 3, False)
    shared = _loads_per_item(model, dec, 4096, 128, 3, True)
    assert 3.9 <= plain <= 4.0 and shared < 0.55 * plain


def test_the_launch_rule_matches_the_ring(model):
    assert reuses_key_tiles(128, 3) and reuses_key_tiles(1, 3) and reuses_key_tiles(256, 5)
    assert not reuses_key_tiles(0, 3) and not reuses_key_tiles(256, 3) and not reuses_key_tiles(512, 4)
    # where the rule says no, sharing would not have happened anyway or would add loads (first tile off the grid)
    for window in (256, 512):
        assert _loads_per_item(model, 100, 4096, window, 3, True) >= _loads_per_item(model, 100, 4096, window, 3, False)
