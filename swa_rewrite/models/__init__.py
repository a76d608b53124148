"""The bundled DeepSeek-V3-style MLA model, its configuration, and the Hugging Face DeepSeek-V2/V3 loader
and saver (``save_pretrained`` keeps a rewritten model's schedule; ``from_pretrained`` gives it back rewritten)."""

from .config import MLAConfig
from .hf import CheckpointMismatchError, from_hf, from_pretrained
from .mla import MLAModel
from .saving import save_pretrained

__all__ = ["MLAConfig", "MLAModel", "from_hf", "from_pretrained", "save_pretrained", "CheckpointMismatchError"]
