"""Random paged batch metadata (docs/design.md §5) shared by the attention kernel tests."""

import math

import torch


def make_batch(requests, ps, device, num_pad=2, extra_blocks=3):
    """Metadata of docs/design.md §5 for ``requests = [(cached_before, new_tokens), …]`` with shuffled physical
    blocks and ``num_pad`` padding tokens; returns a dict of tensors plus per-token positions/requests."""
    B = len(requests)
    max_blocks = max(math.ceil((d + n) / ps) for d, n in requests) + 1
    total_blocks = sum(math.ceil((d + n) / ps) for d, n in requests) + extra_blocks
    perm = torch.randperm(total_blocks)
    bt = torch.full((B, max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, (d, n) in enumerate(requests):
        k = math.ceil((d + n) / ps)
        bt[b, :k] = perm[used:used + k].to(torch.int32)
        used += k
    q_lens = torch.tensor([n for _, n in requests])
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(q_lens, 0)
    enc = torch.tensor([n if n > 1 or d == 0 else 0 for d, n in requests], dtype=torch.int32)
    dec = torch.tensor([d for d, _ in requests], dtype=torch.int32)
    bid = torch.cat([torch.repeat_interleave(torch.arange(B), q_lens), torch.full((num_pad,), -1)]).to(torch.int32)
    pos = torch.cat([torch.arange(d, d + n) for d, n in requests] + [torch.full((num_pad,), -1)])
    meta = dict(block_tables=bt, cu_seqlens_q=cu, seq_lens_encoder=enc, seq_lens_decoder=dec,
                batch_id_per_token=bid)
    return {k: v.to(device) for k, v in meta.items()}, pos, bid.long(), total_blocks
