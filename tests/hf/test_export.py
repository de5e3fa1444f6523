"""export_hf: the folder loads offline through transformers' Auto classes and computes our
logits (1e-4, fp32) for every position encoding x window x MoE layout x shared experts (in
memory by default; through the saved folder for all 36 in the slow run, a few here); greedy
HF `generate()` reproduces ours token for token; sharding and the tokenizer round-trip."""

import itertools
import json
import os
import stat

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from h64lm.hf import export_hf, to_hf_model
from h64lm.model import left_pad
from tests.hf.tiny import VOCAB, tiny_model

POSITIONS = ("rope", "alibi", "rope+alibi")
WINDOWS = (None, 5)
LAYOUTS = ("none", "alternate", "all")
SHARED = (0, 1)


def expected_class(position, window, layout, shared, capacity=None):
    """The class the variant must export to, stated independently of h64lm.hf.stock: the dense
    stock classes, Mixtral for all-MoE without shared experts (it also has windows), Ernie 4.5 for
    the other MoE layouts here (every n-th layer) without a window; ALiBi, capacity and other
    windows need custom code."""
    if position != "rope" or capacity is not None:
        return "H64LMHFForCausalLM"
    if layout == "none":
        return "LlamaForCausalLM" if window is None else "MistralForCausalLM"
    if layout == "all" and shared == 0:
        return "MixtralForCausalLM"
    return "Ernie4_5_MoeForCausalLM" if window is None else "H64LMHFForCausalLM"


def load(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True,
                                                trust_remote_code=True).eval()


VARIANTS = list(itertools.product(POSITIONS, WINDOWS, LAYOUTS, SHARED))


@torch.no_grad()
def check_variant(tmp_path, tokenizer_dir, position, window, layout, shared, via_disk):
    ours = tiny_model(position_encoding=position, sliding_window=window, moe_layers=layout,
                      num_shared_experts=shared, num_layers=3)
    if via_disk:
        info = export_hf(ours, tokenizer_dir, tmp_path)
        hf = load(tmp_path)
        assert info["trust_remote_code"] == (type(hf).__name__ == "H64LMHFForCausalLM")
    else:  # the module export_hf saves, without the disk round trip
        hf = to_hf_model(ours).eval()
    assert type(hf).__name__ == expected_class(position, window, layout, shared)
    ids = torch.randint(0, VOCAB, (2, 21))
    ref = ours(ids).logits
    assert ref.std() > 0.05
    assert (hf(ids).logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("position,window,layout,shared", VARIANTS)
def test_hf_model_logits_match(tmp_path, position, window, layout, shared):
    check_variant(tmp_path, None, position, window, layout, shared, via_disk=False)


@pytest.mark.slow
@pytest.mark.parametrize("position,window,layout,shared", VARIANTS)
def test_exported_folder_logits_match(tmp_path, tiny_tokenizer_dir, position, window, layout,
                                      shared):
    check_variant(tmp_path, tiny_tokenizer_dir, position, window, layout, shared, via_disk=True)


def test_capacity_factor_exports_custom_and_matches(tmp_path, tiny_tokenizer_dir):
    """A capacity drops tokens, which Mixtral never does: custom format, same drops (a capacity at
    evaluation too, since by default evaluation is dropless)."""
    ours = tiny_model(moe_layers="all", capacity_factor=0.5, eval_capacity_factor=0.5)
    export_hf(ours, tiny_tokenizer_dir, tmp_path)
    hf = load(tmp_path)
    assert type(hf).__name__ == expected_class("rope", None, "all", 0, capacity=0.5)
    ids = torch.randint(0, VOCAB, (3, 16))
    with torch.no_grad():
        out = ours(ids)
        assert out.router[0]["dropped"] > 0  # the capacity really binds
        assert (hf(ids).logits - out.logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("overrides", [
    dict(moe_layers="all"),  # Mixtral
    dict(moe_layers="none", sliding_window=4),  # Mistral
    dict(moe_layers="alternate", position_encoding="alibi", sliding_window=4,
         num_shared_experts=1),  # custom
    dict(moe_layers="alternate", position_encoding="rope+alibi", tie_word_embeddings=True),
])
def test_hf_greedy_generate_matches_ours(tmp_path, tiny_tokenizer_dir, overrides):
    ours = tiny_model(**overrides)
    export_hf(ours, tiny_tokenizer_dir, tmp_path)
    hf, tok = load(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    prompts = ["The game was released", "In 1998 the", "It is"]
    ids, mask = left_pad([tok(p)["input_ids"] for p in prompts], pad_token_id=tok.eos_token_id)
    expected = ours.generate(ids, 12, temperature=0.0, attention_mask=mask,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    got = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)


def test_sharding_and_tokenizer_round_trip(tmp_path, tiny_tokenizer_dir):
    ours = tiny_model(moe_layers="alternate")
    single = export_hf(ours, tiny_tokenizer_dir, tmp_path / "one")
    assert "model.safetensors" in single["files"]
    assert "model.safetensors.index.json" not in single["files"]
    sharded = export_hf(ours, tiny_tokenizer_dir, tmp_path / "many", max_shard_size="20KB")
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= set(sharded["files"])
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(sharded["files"])
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "many")(ids).logits, ours(ids).logits, atol=1e-4)
    text = "Valkyria Chronicles III is a tactical role-playing game."
    original = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "many"))
    # the export adds BOS as our training data does; the rest is the original encoding
    assert exported(text)["input_ids"] == [original.bos_token_id] + original(text)["input_ids"]
    generation = json.loads((tmp_path / "many" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == original.eos_token_id


def test_tokenizer_larger_than_vocab_is_rejected(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(ValueError, match="model.vocab_size"):
        export_hf(tiny_model(vocab_size=64), tiny_tokenizer_dir, tmp_path)


@pytest.mark.parametrize("routing,expected", [
    (dict(num_experts_per_token=1), "qwen2_moe"),  # Switch top-1: raw probability (norm_topk_prob=false)
    (dict(router_norm_topk=True, num_experts_per_token=1), "mixtral"),
])
def test_top1_routing_exports_exactly(routing, expected):
    from h64lm.hf import stock_architecture, to_hf_model
    from h64lm.model import H64LMConfig, H64LMForCausalLM

    cfg = H64LMConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=2, num_kv_heads=1,
                      intermediate_size=48, moe_intermediate_size=24, num_experts=4, moe_layers="all",
                      **routing)
    assert (stock_architecture(cfg) or "custom") == expected
    torch.manual_seed(0)
    model = H64LMForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.allclose(to_hf_model(model)(ids).logits, model(ids).logits, atol=1e-4)


def test_routing_without_an_exported_form_is_refused_in_one_line():
    """Sigmoid routing on alternate layers: GLM-4.5 needs the sparse layers last, the custom
    format routes by softmax."""
    from h64lm.hf import to_hf_model
    from h64lm.model import H64LMConfig, H64LMForCausalLM

    cfg = H64LMConfig(vocab_size=64, hidden_size=32, num_layers=4, num_attention_heads=2, num_kv_heads=1,
                      num_experts=4, router_score="sigmoid")
    with pytest.raises(ValueError, match="model.router_score='sigmoid' has no exported equivalent") as err:
        to_hf_model(H64LMForCausalLM(cfg))
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- where an export goes
def test_export_into_a_file_is_one_line_and_leaves_it(tmp_path, tiny_tokenizer_dir):
    target = tmp_path / "model.bin"
    target.write_text("keep")
    with pytest.raises(ValueError, match="is a file") as err:
        export_hf(tiny_model(), tiny_tokenizer_dir, target)
    assert "\n" not in str(err.value) and target.read_text() == "keep"


def test_foreign_folder_needs_overwrite_and_an_earlier_export_is_replaced(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="export.overwrite=true") as err:
        export_hf(tiny_model(), tiny_tokenizer_dir, out)
    assert "\n" not in str(err.value) and [p.name for p in out.iterdir()] == ["notes.txt"]
    export_hf(tiny_model(seed=1), tiny_tokenizer_dir, out, overwrite=True)
    assert not (out / "notes.txt").exists()
    second = tiny_model(seed=2)
    export_hf(second, tiny_tokenizer_dir, out, record={"step": 7})  # an earlier export: no switch needed
    assert json.loads((out / "h64lm_export.json").read_text())["step"] == 7
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert torch.allclose(load(out)(ids).logits, second(ids).logits, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old copies left


def test_a_failed_export_leaves_the_earlier_one_whole(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import h64lm.hf.export as export_module

    out = tmp_path / "out"
    export_hf(tiny_model(), tiny_tokenizer_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "export_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        export_hf(tiny_model(seed=3), tiny_tokenizer_dir, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_every_file_has_the_umask_permissions(tmp_path, tiny_tokenizer_dir):
    """safetensors writes weights 0600; the folder is meant to be shared like the rest."""
    old = os.umask(0o027)
    try:
        export_hf(tiny_model(), tiny_tokenizer_dir, tmp_path / "out")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o640
    assert set(modes.values()) == {0o640}, modes


# ----------------------------------------------------------------------------- the tokenizer
def test_mistral_tokenizer_loads_without_custom_code_and_encodes_as_sentencepiece(tmp_path, monkeypatch):
    """The default tokenizer, exported with the default model (a stock class): plain
    AutoTokenizer, no question asked (input() would fail), BOS first, then sentencepiece's ids."""
    import builtins

    import sentencepiece
    from transformers import AutoTokenizer

    from h64lm.data import DataConfig, load_tokenizer
    from h64lm.data.tokenizer import mistral_model_file
    from h64lm.data.wiki import excerpt_text
    from h64lm.model import H64LMConfig, H64LMForCausalLM

    export_hf(H64LMForCausalLM(H64LMConfig()), load_tokenizer(DataConfig()), tmp_path / "out")

    def no_prompt(*args):
        raise AssertionError("AutoTokenizer asked a question")

    monkeypatch.setattr(builtins, "input", no_prompt)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok("The quick brown fox")["input_ids"] == [1, 415, 2936, 9060, 285, 1142]
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_model_file()))
    lines = [x for x in excerpt_text(20_000).splitlines() if x.strip()][:40]
    for line in lines:
        assert tok(line)["input_ids"] == [sp.bos_id()] + sp.encode(line), line


def test_chat_template_hook_is_saved(tmp_path, tiny_tokenizer_dir):
    from h64lm.hf import export_tokenizer

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    export_tokenizer(tiny_tokenizer_dir, tmp_path, chat_template=template)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.chat_template == template
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


def test_export_overwrite_is_typed():
    """A bool in the schema: a non-bool value and a misspelt key fail while composing."""
    from tests.helpers import run_config

    assert run_config(["export.overwrite=true"]).export.overwrite is True
    with pytest.raises(Exception, match="overwrite"):
        run_config(["export.overwrite=maybe"])
    with pytest.raises(Exception, match="overwrit"):
        run_config(["export.overwrit=true"])
