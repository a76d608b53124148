"""Comparison helpers shared by the numerics tests."""

import torch


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
