"""The paged, absorbed MLA model equals an independent dense float64 model (docs/design.md §5, issue 2)."""

import random

import pytest
import torch

from mla_reference import dense_logits
from numerics import rel_err
from swa_rewrite.models import MLAConfig, MLAModel
from swa_rewrite.runtime import StepBatch, StepItem

YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=0.7)
VARIANTS = {
    "tiny": MLAConfig.named("tiny"),
    "neox-no-qlora": MLAConfig.named("tiny").replace(rope_interleave=False, q_lora_rank=None),
    "yarn-8heads": MLAConfig.named("tiny").replace(rope_scaling=YARN, num_attention_heads=8),
}


def nan_caches(model, num_blocks, page_size):
    caches = model.allocate_kv_cache(num_blocks, page_size)
    for c in caches:
        c.fill_(float("nan"))
    return caches


def run_step(model, caches, items, page_size, **kw):
    batch = StepBatch.build(items, page_size, **kw)
    return model(batch.input_ids, kv_caches=caches, meta=batch.meta), batch


def prefill_in_chunks(model, tokens, chunk, page_size, block_table, caches):
    """Logits ``[len(tokens), vocab]`` from prefilling ``tokens`` ``chunk`` tokens per step."""
    rows = []
    for start in range(0, len(tokens), chunk):
        item = StepItem(tokens[start:start + chunk], start, block_table, is_prefill=True)
        logits, _ = run_step(model, caches, [item], page_size)
        rows.append(logits)
    return torch.cat(rows)


def random_table(num_blocks, n, rng):
    return rng.sample(range(num_blocks), n)


# Every page size × chunk size (1000 = one-shot prefill) on each config variant, except chunk 1 on
# large pages outside the base variant, which adds time and no new path.
CASES = [(v, ps, ch) for v in sorted(VARIANTS) for ps in (1, 7, 16, 64) for ch in (1, 3, 17, 1000)
         if not (ch == 1 and ps in (16, 64) and v != "tiny")]
CASES += [("tiny", ps, 17) for ps in (53, 128, 256)]   # docs/design.md §5's other page sizes


@pytest.mark.parametrize("variant,page_size,chunk", CASES)
def test_chunked_prefill_matches_dense(variant, page_size, chunk, seed):
    rng = random.Random(seed)
    model = MLAModel(VARIANTS[variant], seed=seed)
    L = rng.randint(20, 45)
    tokens = [rng.randrange(model.config.vocab_size) for _ in range(L)]
    nblk = -(-L // page_size)
    num_blocks = nblk + 5
    caches = nan_caches(model, num_blocks, page_size)
    got = prefill_in_chunks(model, tokens, chunk, page_size, random_table(num_blocks, nblk, rng), caches)
    assert rel_err(got, dense_logits(model, tokens)) < 1e-5


def test_prefix_reuse_and_mixed_batch(seed):
    """One step mixing a decode, a prefill chunk over cached history, a fresh prefill sharing a cached
    prefix (by block reference), and trailing padding tokens."""
    rng = random.Random(seed)
    page_size = 7
    model = MLAModel(MLAConfig.named("tiny"), seed=seed)
    V = model.config.vocab_size
    num_blocks = 40
    caches = nan_caches(model, num_blocks, page_size)
    free = random_table(num_blocks, num_blocks, rng)
    seq_a = [rng.randrange(V) for _ in range(30)]            # decode after 29 cached tokens
    seq_b = [rng.randrange(V) for _ in range(33)]            # chunk [20, 33) after 20 cached
    shared = seq_a[:14]                                       # two full blocks of A
    seq_c = shared + [rng.randrange(V) for _ in range(9)]   # new request reusing A's first two blocks
    table_a = [free.pop() for _ in range(5)]
    table_b = [free.pop() for _ in range(5)]
    table_c = table_a[:2] + [free.pop() for _ in range(2)]
    # History: A's first 29 tokens and B's first 20, in one step with padding.
    run_step(model, caches, [StepItem(seq_a[:29], 0, table_a, True), StepItem(seq_b[:20], 0, table_b, True)],
             page_size, pad_to=53)
    snapshot = [c.clone() for c in caches]
    items = [StepItem(seq_a[29:30], 29, table_a, False),
             StepItem(seq_b[20:33], 20, table_b, True),
             StepItem(seq_c[14:], 14, table_c, True)]
    logits, batch = run_step(model, caches, items, page_size, pad_to=30, max_blocks=8)
    cu = batch.meta.cu_seqlens_q.tolist()
    assert rel_err(logits[cu[0]:cu[1]], dense_logits(model, seq_a)[29:30]) < 1e-5
    assert rel_err(logits[cu[1]:cu[2]], dense_logits(model, seq_b)[20:33]) < 1e-5
    assert rel_err(logits[cu[2]:cu[3]], dense_logits(model, seq_c)[14:]) < 1e-5
    # The shared prefix blocks were read, never rewritten; padding wrote nothing anywhere.
    written = set(batch.meta.slot_mapping[batch.meta.slot_mapping >= 0].tolist())
    for before, after in zip(snapshot, caches):
        b, a = before.view(-1, before.shape[-1]), after.view(-1, after.shape[-1])
        untouched = torch.tensor([s not in written for s in range(b.shape[0])])
        assert torch.equal(b[untouched].isnan(), a[untouched].isnan())
        assert torch.equal(torch.nan_to_num(b[untouched]), torch.nan_to_num(a[untouched]))


def test_multi_token_decode(seed):
    """A decode with several query tokens (multi-token prediction) after a prefill."""
    rng = random.Random(seed)
    model = MLAModel(MLAConfig.named("tiny"), seed=seed)
    tokens = [rng.randrange(model.config.vocab_size) for _ in range(26)]
    caches = nan_caches(model, 8, 16)
    table = [3, 5]
    run_step(model, caches, [StepItem(tokens[:23], 0, table, True)], 16)
    logits, _ = run_step(model, caches, [StepItem(tokens[23:], 23, table, False)], 16)
    assert rel_err(logits, dense_logits(model, tokens)[23:]) < 1e-5


def test_logits_indices_selects_rows(seed):
    model = MLAModel(MLAConfig.named("tiny"), seed=seed)
    tokens = torch.randint(0, model.config.vocab_size, (12,)).tolist()
    batch = StepBatch.build([StepItem(tokens, 0, [0], True)], 16)
    full = model(batch.input_ids, kv_caches=nan_caches(model, 1, 16), meta=batch.meta)
    idx = torch.tensor([11, 0, 5])
    part = model(batch.input_ids, kv_caches=nan_caches(model, 1, 16), logits_indices=idx, meta=batch.meta)
    torch.testing.assert_close(part, full[idx])


def test_seeded_init_is_deterministic():
    a, b = MLAModel(MLAConfig.named("tiny"), seed=3), MLAModel(MLAConfig.named("tiny"), seed=3)
    c = MLAModel(MLAConfig.named("tiny"), seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


def test_meta_device_model_and_cache():
    model = MLAModel(MLAConfig.named("v3-attn"), device="meta", dtype=torch.bfloat16)
    caches = model.allocate_kv_cache(num_blocks=4, page_size=64)
    assert len(caches) == 4
    assert all(c.device.type == "meta" and c.shape == (4, 64, 576) and c.dtype == torch.bfloat16 for c in caches)
    tiny = MLAModel(MLAConfig.named("tiny"), device="meta")
    batch = StepBatch.build([StepItem([1, 2, 3], 0, [0], True)], 16, device="meta")
    out = tiny(batch.input_ids, kv_caches=tiny.allocate_kv_cache(2, 16), meta=batch.meta)
    assert out.shape == (3, tiny.config.vocab_size) and out.device.type == "meta"


def test_config_names_and_validation():
    v3 = MLAConfig.named("v3-attn")
    assert (v3.num_attention_heads, v3.kv_lora_rank, v3.qk_rope_head_dim, v3.latent_dim) == (128, 512, 64, 576)
    assert (v3.qk_nope_head_dim, v3.v_head_dim, v3.hidden_size, v3.q_lora_rank) == (128, 128, 7168, 1536)
    with pytest.raises(ValueError, match="unknown config name 'big'"):
        MLAConfig.named("big")
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        MLAConfig(qk_rope_head_dim=3)
