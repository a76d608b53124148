"""The launchers' host integer helpers give what Triton's own constexpr functions give (they replace them on the
host path: each ``triton.cdiv`` / ``triton.next_power_of_2`` call there costs a constexpr-function wrapper)."""

import random

import triton

from swa_rewrite.kernels import cdiv, next_pow2


def test_cdiv_and_next_pow2_match_triton():
    rng = random.Random()
    values = list(range(0, 1100)) + [rng.randrange(1 << 40) for _ in range(500)] + [2**31 - 1, 2**31, 2**31 + 1]
    for n in values:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        d = rng.randrange(1, 300)
        assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
        assert cdiv(n, 64) == triton.cdiv(n, 64), n
