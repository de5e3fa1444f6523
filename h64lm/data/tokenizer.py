"""The tokenizer: the Mistral 32k sentencepiece model as a fast Hugging Face tokenizer.

`data.tokenizer="mistral"` takes `mistral_common/data/tokenizer.model.v1` (Apache-2.0) from the
mistral-common wheel. transformers 5.x builds a broken 3-token tokenizer from
`LlamaTokenizerFast(vocab_file=...)`; loading a folder holding `tokenizer.model` through
`AutoTokenizer` converts it exactly, so that is done once and the resulting `tokenizer.json` is
cached (loading it again takes ~0.1 s instead of ~0.5 s).

Text is encoded with `split_special_tokens=True`: a literal "<unk>" or "</s>" in a document is
ordinary text, as in sentencepiece, never a control id (WikiText is full of "<unk>").
BOS/EOS are added by our code, never by the tokenizer.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from h64lm.data.cache import build_once
from h64lm.data.config import DataConfig, resolve_cache_dir

__all__ = ["Tokenizer", "check_vocab", "load_tokenizer", "mistral_model_file"]

MISTRAL = "mistral"


def mistral_model_file() -> Path:
    """The sentencepiece model shipped in the mistral-common wheel."""
    path = Path(str(resources.files("mistral_common") / "data" / "tokenizer.model.v1"))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: install mistral-common (requirements.txt) or set "
            "data.tokenizer=<a Hugging Face tokenizer folder>"
        )
    return path


class Tokenizer:
    """A fast HF tokenizer with the ids our code needs.

    `pad_id` is the tokenizer's pad token when it has one, else EOS (Mistral has no pad). The
    training windows are packed and never padded; pad only fills ragged generation batches.
    """

    def __init__(self, hf) -> None:
        if not hf.is_fast:
            raise ValueError(f"data.tokenizer: {type(hf).__name__} is not a fast tokenizer")
        self.hf = hf
        self.vocab_size: int = len(hf)
        self.bos_id: int | None = hf.bos_token_id
        self.eos_id: int = hf.eos_token_id
        if self.eos_id is None:
            raise ValueError("data.tokenizer has no EOS token, which joins documents")
        self.pad_id: int = hf.pad_token_id if hf.pad_token_id is not None else self.eos_id
        self.fingerprint = hashlib.sha256(hf.backend_tokenizer.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.hf(text, add_special_tokens=False)["input_ids"]
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False,
                     eos: bool = False) -> list[list[int]]:
        return [self._wrap(ids, bos, eos)
                for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        head = [self.bos_id] if bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if eos else [])


def _convert_mistral(out: Path) -> None:
    from transformers import AutoTokenizer

    source = out / "source"
    source.mkdir()
    shutil.copyfile(mistral_model_file(), source / "tokenizer.model")
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(out))
    shutil.rmtree(source)


def _mistral_folder(cache_dir: Path) -> Path:
    digest = hashlib.sha256(mistral_model_file().read_bytes()).hexdigest()[:12]
    folder, _ = build_once(cache_dir / "tokenizers" / f"mistral-v1-{digest}", _convert_mistral)
    return folder


def load_tokenizer(cfg: DataConfig) -> Tokenizer:
    from transformers import AutoTokenizer

    if cfg.tokenizer == MISTRAL:
        folder = _mistral_folder(resolve_cache_dir(cfg))
    else:
        folder = Path(cfg.tokenizer).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"data.tokenizer={cfg.tokenizer!r} is neither 'mistral' nor an existing "
                "Hugging Face tokenizer folder"
            )
    try:
        hf = AutoTokenizer.from_pretrained(str(folder), split_special_tokens=True)
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"data.tokenizer={cfg.tokenizer!r} is not a loadable Hugging Face tokenizer folder "
            f"({first[:160]})"
        ) from None
    return Tokenizer(hf)


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Fail at start-up, not with an index error mid-run, when token ids do not fit the model."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"model.vocab_size={model_vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} ids (data.tokenizer); set model.vocab_size>="
            f"{tokenizer.vocab_size} or choose another data.tokenizer"
        )
    if tokenizer.vocab_size < model_vocab_size:
        warnings.warn(f"model.vocab_size={model_vocab_size} is larger than the tokenizer's {tokenizer.vocab_size} "
                      f"ids: {model_vocab_size - tokenizer.vocab_size} embedding rows are never used "
                      f"(set model.vocab_size={tokenizer.vocab_size} unless you pad it on purpose)", stacklevel=2)
