"""Coarse-to-fine stacked generator over factorized variable-length codes (DQ-Transformer x FAR heads).

```python
from models.generator import Generator, GeneratorConfig, sample, encode_sequences, pack
model = Generator(GeneratorConfig.from_yaml("configs/generator/tiny.yaml"))
batch = pack(model.spec, encode_sequences(model.spec, grains, codes), labels, max_tokens=512,
             null_label=model.config.null_class, row_length=512)
losses = model(batch)                        # {"loss", "position", "content/j", "accuracy/...", ...}
log_likelihood = model.log_likelihood(batch) # [B]: the sampler's log-probability of every sequence
maps = sample(model, [3, 7], cfg_scale=2.0)  # [(grain uint8 [Hs, Ws], codes int64 [L, K]), ...]
```
"""
from models.generator.attention import DocumentMask
from models.generator.decoding import SampledTokens, TokenFilter, ValidityRule, generate_tokens, sample
from models.generator.sequence import (IGNORE, FlatSequences, PackedBatch, SequenceSpec, Targets, decode_sequences,
                                       encode_sequences, next_token_targets, pack, unpack, valid_choices)
from models.generator.stacked import (FactorizedHead, Generator, GeneratorCache, GeneratorConfig, GeneratorOutput,
                                      TokenScores)

__all__ = ["Generator", "GeneratorConfig", "GeneratorCache", "GeneratorOutput", "FactorizedHead", "SequenceSpec",
           "FlatSequences", "PackedBatch", "Targets", "IGNORE", "encode_sequences", "decode_sequences", "pack",
           "unpack", "next_token_targets", "valid_choices", "DocumentMask", "TokenScores", "TokenFilter",
           "ValidityRule", "SampledTokens", "generate_tokens", "sample"]
