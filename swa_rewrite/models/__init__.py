"""The bundled DeepSeek-V3-style MLA model and its configuration."""

from .config import MLAConfig
from .mla import MLAModel

__all__ = ["MLAConfig", "MLAModel"]
