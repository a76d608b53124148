"""``thread_value(local, name, value)``: a ``threading.local`` attribute set for one block, in this thread.

The switches that hold for a block of one thread (``ops.checks.checks_disabled``, ``models.fused.op_by_op``,
``ops.decode_plans.no_plans``) and the per-thread recorders (``kernels.launch.recording``,
``kernels.paged_mla.gluon_calls``) are this one pattern.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator


@contextlib.contextmanager
def thread_value(local: threading.local, name: str, value: Any) -> Iterator[Any]:
    """Set ``local.<name>`` to ``value`` for the block (yielding ``value``), then restore what it was (unset: None)."""
    saved = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield value
    finally:
        setattr(local, name, saved)
