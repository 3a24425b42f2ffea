"""dalle-transformer: the DALLE decoder over ``[BOS, text ids, image ids]``, trained and sampled on token ids only."""

from dalle_transformer.config import DALLEConfig
from dalle_transformer.model import DALLE, DALLELoss, DALLEOutput

__all__ = ["DALLE", "DALLEConfig", "DALLELoss", "DALLEOutput"]
__version__ = "0.1.0"
