"""swa-rewrite: turn full-attention layers of MLA models into sliding-window attention, as a compiler pass."""

from . import ops  # noqa: F401  (registers torch.ops.swa_rewrite.*)

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
