"""Pure Triton kernels and their launchers (no torch.library code here; see ``swa_rewrite.ops``)."""

import os

# Triton decides at decoration time (when a kernel module imports) whether a @triton.jit kernel runs in its
# interpreter, from TRITON_INTERPRET: read it once here, before any of these modules decorate a kernel, so the
# launchers agree with the kernels and a launch does not read the environment (a few µs, several times a call).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def interpreting() -> bool:
    """Whether Triton runs these kernels in its interpreter (``TRITON_INTERPRET`` set to a true value at import)."""
    return _INTERPRET


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` of host integers: ``triton.cdiv`` without its constexpr-function wrapper (~5 µs a call on
    a launch's host path)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two ``>= n`` (0 for ``n = 0``), as ``triton.next_power_of_2`` on host integers."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
