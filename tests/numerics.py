"""Comparison helpers shared by the numerics tests."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``‖a - b‖ / ‖b‖`` (Frobenius), computed in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
