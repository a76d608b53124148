"""Pure Triton kernels and their launchers (no torch.library code here; see ``swa_rewrite.ops``)."""

import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET`` set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
