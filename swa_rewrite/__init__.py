"""swa-rewrite: turn full-attention layers of MLA models into sliding-window attention, as a compiler pass.

Public API (docs/design.md §11): ``Schedule``, ``apply``, ``graph_diff``, ``backend``; ``ops``; ``models``; ``runtime``.
"""

from . import ops  # noqa: F401  (registers torch.ops.swa_rewrite.*)
from .compile import SWABackend, SWACompiledModel, SWAPostGradPass, backend, compile  # noqa: F401
from .graph_diff import GraphDiff, graph_diff
from .models import from_pretrained, save_pretrained  # noqa: F401  (saved rewritten models, models/saving.py)
from .passes import RewriteError
from .rewrite import RewriteReport, SWAModule, apply
from .schedule import Schedule

__version__ = "0.1.0"
__all__ = ["GraphDiff", "RewriteError", "RewriteReport", "SWABackend", "SWACompiledModel", "SWAModule",
           "SWAPostGradPass", "Schedule", "apply", "backend", "graph_diff", "ops", "__version__"]
# `swa_rewrite.compile(model, schedule, **kw)` is public too, but kept out of `import *` (it would shadow
# the builtin `compile`).
