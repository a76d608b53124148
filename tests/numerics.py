"""Comparison helpers shared by the numerics tests."""

import torch

# The engine against the dense reference with the same layers' latents through FP8: they compute the latents in
# different float orders, so usually the same FP8 bits (median 4e-7 apart over ~250 runs of these tests), but a
# last-bit difference can round one element to its neighbouring FP8 value and move a tiny model's logits by
# 1e-3 to 2.3e-3 (CI seeds 2454642212, 4025704701), more where flips compound over several sliding layers. A wrong
# window, sinks or cache group is >= 0.22 away in the same tests.
FP8_FLIP_TOL = 1e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a - b‖ / ‖b‖`` (Frobenius), computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def assert_greedy_agrees(ours, theirs, prompt, engine_logits, ref_logits, tol):
    """Token lists equal, or they part at a near-tie: where they first differ, our logits are within ``tol``
    (relative) of the reference's, and the reference's margin of its token over ours is within twice our
    logits' max deviation there."""
    assert len(ours) == len(theirs)
    if ours == theirs:
        return
    i = next(j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    prefix = prompt + theirs[:i]
    got, ref = engine_logits(prefix)[-1], ref_logits(prefix)[-1]
    assert rel_err(got, ref) <= tol, f"token {i}: logits differ by {rel_err(got, ref):.3g}"
    margin = (ref[theirs[i]] - ref[ours[i]]).item()
    assert margin <= 2 * (got - ref).abs().max().item(), \
        f"token {i}: ours {ours[i]} vs reference {theirs[i]} with reference margin {margin:.4g}"
