"""Variable-length visual tokenizer: dynamic granularity (DQ-VAE) x factorized codebooks (FQGAN)."""
from models.tokenizer.decoder import Decoder, DecoderConfig, merge_levels
from models.tokenizer.encoder import Encoder, EncoderConfig
from models.tokenizer.quantizer import FactorizedQuantizer, QuantizerConfig, SubCodebookConfig, cosine_lookup
from models.tokenizer.router import Router, RouterConfig, calibrate_entropy, region_entropy
from models.tokenizer.tokenizer import ImageCodes, SemanticConfig, Tokenizer, TokenizerConfig, build_teachers

__all__ = ["Decoder", "DecoderConfig", "Encoder", "EncoderConfig", "FactorizedQuantizer", "ImageCodes",
           "QuantizerConfig", "Router", "RouterConfig", "SemanticConfig", "SubCodebookConfig", "Tokenizer",
           "TokenizerConfig", "build_teachers", "calibrate_entropy", "cosine_lookup", "merge_levels",
           "region_entropy"]
