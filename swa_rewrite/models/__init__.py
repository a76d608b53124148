"""The bundled DeepSeek-V3-style MLA model, its configuration, and the Hugging Face DeepSeek-V2/V3 loader."""

from .config import MLAConfig
from .hf import CheckpointMismatchError, from_hf, from_pretrained
from .mla import MLAModel

__all__ = ["MLAConfig", "MLAModel", "from_hf", "from_pretrained", "CheckpointMismatchError"]
