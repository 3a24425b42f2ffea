"""dalle-transformer: the DALLE decoder over ``[BOS, text ids, image ids]``, trained and sampled on token ids only."""

from dalle_transformer.accounting import AttentionWork, DecodeWork, decode_attention_work, forward_attention_work
from dalle_transformer.cache import KVCache
from dalle_transformer.config import ARCHITECTURES, ATTENTION_TYPES, DALLEConfig
from dalle_transformer.dalle_pytorch import config_from_dalle_pytorch, convert_dalle_pytorch_weights
from dalle_transformer.encoder_decoder import EncoderDecoderCache, EncoderDecoderDALLE
from dalle_transformer.masks import AttentionPattern, layer_patterns
from dalle_transformer.model import DALLE, DALLELoss, DALLEOutput
from dalle_transformer.sampling import top_k_from_filter_thres

__all__ = [
    "ARCHITECTURES",
    "ATTENTION_TYPES",
    "DALLE",
    "AttentionPattern",
    "AttentionWork",
    "DALLEConfig",
    "DALLELoss",
    "DALLEOutput",
    "DecodeWork",
    "EncoderDecoderCache",
    "EncoderDecoderDALLE",
    "KVCache",
    "config_from_dalle_pytorch",
    "convert_dalle_pytorch_weights",
    "decode_attention_work",
    "forward_attention_work",
    "layer_patterns",
    "top_k_from_filter_thres",
]
__version__ = "0.1.0"
