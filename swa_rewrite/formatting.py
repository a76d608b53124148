"""Human-readable sizes for the reports and the CLI (one formatter, so every table prints bytes alike)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``n`` bytes in B, KiB, MiB, GiB or TiB (binary units; one decimal above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")
