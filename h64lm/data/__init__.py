"""Data: the Mistral tokenizer, text sources, the token cache and the window sampler."""

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.data.config import DataConfig
from h64lm.data.loader import TokenLoader, validation_windows
from h64lm.data.prepare import Corpus, prepare_corpus
from h64lm.data.protocol import Loader
from h64lm.data.tokenizer import Tokenizer, check_vocab, load_tokenizer

__all__ = [
    "Batch",
    "IGNORE_INDEX",
    "Loader",
    "Corpus",
    "DataConfig",
    "TokenLoader",
    "Tokenizer",
    "check_vocab",
    "load_tokenizer",
    "prepare_corpus",
    "validation_windows",
]
