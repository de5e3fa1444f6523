import itertools
import random

import pytest
import sentencepiece as spm

import h64lm.data.tokenizer as tokenizer_module
from h64lm.data import DataConfig, check_vocab, load_tokenizer
from h64lm.data.tokenizer import mistral_model_file
from h64lm.data.wiki import wiki_articles


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(mistral_model_file()))


def test_quick_brown_fox_matches_sentencepiece(tokenizer, sp):
    assert tokenizer.encode("The quick brown fox") == [415, 2936, 9060, 285, 1142]
    assert sp.encode("The quick brown fox") == [415, 2936, 9060, 285, 1142]


def test_special_ids(tokenizer, sp):
    assert tokenizer.vocab_size == sp.get_piece_size() == 32000
    assert (tokenizer.bos_id, tokenizer.eos_id) == (sp.bos_id(), sp.eos_id()) == (1, 2)
    assert tokenizer.pad_id == tokenizer.eos_id  # Mistral has no pad token
    assert tokenizer.encode("Hi", bos=True, eos=True) == [1, *sp.encode("Hi"), 2]


def test_paragraphs_match_sentencepiece(tokenizer, sp):
    paragraphs = [p for _, text in itertools.islice(wiki_articles(), 5)
                  for p in text.split("\n\n")]
    extra = ["  two leading spaces", "tab\there", "emoji 😀 中文 ∑", "a\n\nb\nc", "",
             "literal <unk> and </s> and <s> are text", " = Title = \n"]
    texts = paragraphs[:200] + extra
    assert tokenizer.encode_batch(texts) == [sp.encode(t) for t in texts]


def test_wikitext_unk_is_text_like_sentencepiece(tokenizer, sp, wikitext2_valid):
    lines = [line for line in wikitext2_valid.read_text().splitlines() if "<unk>" in line][:100]
    assert lines
    assert tokenizer.encode_batch(lines) == [sp.encode(line) for line in lines]


def test_round_trip(tokenizer):
    text = "Anarchism is a political philosophy.\n\nIt has 3 schools: ∀x, café, 東京."
    assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == text


def test_decode_of_generated_ids_matches_sentencepiece(tokenizer, sp):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, 32000) for _ in range(rng.randrange(1, 40))]
        assert tokenizer.decode(ids) == sp.decode(ids)
    assert tokenizer.decode([1, 415, 2936, 2]) == "The quick"


def test_conversion_is_cached(session_cache, tokenizer, monkeypatch):
    folders = [p for p in (session_cache / "tokenizers").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file()

    def fail(out):
        raise AssertionError("the cached tokenizer.json should have been reused")

    monkeypatch.setattr(tokenizer_module, "_convert_mistral", fail)
    again = load_tokenizer(DataConfig(cache_dir=str(session_cache)))
    assert again.fingerprint == tokenizer.fingerprint


def test_hf_folder_tokenizer(tmp_path, tokenizer):
    tokenizer.hf.save_pretrained(str(tmp_path / "tok"))
    other = load_tokenizer(DataConfig(tokenizer=str(tmp_path / "tok"), cache_dir=str(tmp_path)))
    assert other.encode("The quick brown fox") == [415, 2936, 9060, 285, 1142]


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(ValueError, match=r"data.tokenizer=.*nope.*neither 'mistral'"):
        load_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope"), cache_dir=str(tmp_path)))


def test_check_vocab(tokenizer):
    check_vocab(tokenizer, 32000)
    check_vocab(tokenizer, 32064)
    with pytest.raises(ValueError, match=r"model.vocab_size=1000 .*32000.*data.tokenizer"):
        check_vocab(tokenizer, 1000)
