"""Cross-tokenizer distillation: the vocabulary map between two tokenizers
(:mod:`~kubedistill.crosstok.vocab`) and the alignment of their tokenizations of the same
text by byte offsets (:mod:`~kubedistill.crosstok.align`)."""

from kubedistill.crosstok.align import (
                                        align_continuation,
                                        align_pairs,
                                        align_rollouts,
                                        flatten_pairs,
                                        unflatten_pairs,
)
from kubedistill.crosstok.bridge import TokenizerBridge
from kubedistill.crosstok.vocab import (
                                        VOCAB_MAP_FILE,
                                        TokenTable,
                                        VocabMap,
                                        build_vocab_map,
                                        token_table,
                                        vocab_map_hash,
)

__all__ = ["VOCAB_MAP_FILE", "TokenTable", "TokenizerBridge", "VocabMap", "align_continuation",
           "align_pairs", "align_rollouts", "build_vocab_map", "flatten_pairs", "token_table",
           "unflatten_pairs", "vocab_map_hash"]
