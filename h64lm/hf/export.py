"""Write a trained H64LM model as a Hugging Face folder that transformers, lm-eval and the hub read.

A stock class (see `stock.py`: Llama, Mistral, Mixtral, Qwen2-MoE, Qwen3-MoE, Ernie 4.5 MoE,
GLM-4.5 MoE) when one expresses the variant exactly, otherwise our own `modeling_h64lm.py` +
`configuration_h64lm.py`, copied into the folder and named in `auto_map` (load with
`trust_remote_code=True`).

The folder is written beside its destination and renamed into place, so a reader never sees half
an export and a failed export leaves an earlier one whole. `h64lm_export.json` records what was
exported (checkpoint, step, the full H64LMConfig); it also marks the folder as ours, so a later
export may replace it, while any other non-empty folder is refused unless `overwrite`.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM

from .sequence_classification import classifier_architecture, to_hf_sequence_classifier
from .stock import stock_architecture, to_hf_stock

__all__ = ["EXPORT_RECORD", "check_export_target", "check_exportable", "custom_config", "export_hf",
           "export_tokenizer", "hf_tokenizer", "to_hf_custom", "to_hf_model"]

CUSTOM = "h64lm"
EXPORT_RECORD = "h64lm_export.json"


def custom_config(c: H64LMConfig, **extra):
    """H64LMConfig -> H64LMHFConfig (the custom format's config.json)."""
    from .configuration_h64lm import H64LMHFConfig

    return H64LMHFConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_kv_heads,
        intermediate_size=c.intermediate_size, moe_intermediate_size=c.expert_intermediate_size,
        num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_token,
        moe_layer_ids=c.moe_layer_indices(), num_shared_experts=c.num_shared_experts,
        capacity_factor=c.capacity_factor, eval_capacity_factor=c.eval_capacity_factor,
        norm_topk_prob=c.normalize_topk, max_position_embeddings=c.max_position_embeddings,
        position_encoding=c.position_encoding, rope_theta=c.rope_theta,
        attention_window=c.sliding_window, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings, initializer_range=c.initializer_range,
        qk_norm=c.qk_norm, logit_softcap=c.logit_softcap, weight_init=c.init, **extra)


def check_exportable(c: H64LMConfig) -> None:
    """Variants that neither a stock class nor the custom format expresses fail in one line,
    before any file is written."""
    if stock_architecture(c) is not None or not c.moe_layer_indices():
        return
    unsupported = [f"model.{k}={v!r}" for k, v, ok in [
        ("router_score", c.router_score, c.router_score == "softmax"),
        ("router_bias_update_rate", c.router_bias_update_rate, c.router_bias_update_rate == 0),
        ("capacity_priority", c.capacity_priority, c.capacity_priority == "token")] if not ok]
    if unsupported:
        raise ValueError(f"cannot export to Hugging Face format: {', '.join(unsupported)} has no exported "
                         "equivalent with these other options (the custom format routes by softmax without a "
                         "selection bias, in token order; see h64lm/hf/stock.py for the stock classes)")


@torch.no_grad()
def to_hf_custom(model: H64LMForCausalLM):
    """The custom-format transformers model equal to `model` (same device, dtype and mode)."""
    from .modeling_h64lm import H64LMHFForCausalLM

    check_exportable(model.config)
    hf = H64LMHFForCausalLM(custom_config(model.config))
    param = next(model.parameters())
    hf.to(device=param.device, dtype=param.dtype)
    state = {k if k.startswith("lm_head.") else "model." + k: v  # a reward model's score head is left out
             for k, v in model.state_dict().items() if not k.startswith("score.")}
    hf.load_state_dict(state, strict=True)
    return hf.train(model.training)


def to_hf_model(model: H64LMForCausalLM):
    """A stock transformers model when one is exact, else the custom one."""
    return to_hf_custom(model) if stock_architecture(model.config) is None else to_hf_stock(model)


def hf_tokenizer(tokenizer: Any):
    """A tokenizer folder, our `h64lm.data.tokenizer.Tokenizer`, or a HF tokenizer -> HF tokenizer."""
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    return getattr(tokenizer, "hf", tokenizer)


def export_tokenizer(tokenizer: Any, out_dir: Union[str, Path], chat_template: Optional[str] = None):
    """Save `tokenizer` into `out_dir` as plain `tokenizer.json` + `tokenizer_config.json` (the
    generic fast tokenizer: no custom code) that adds BOS as our training data does
    (`<s> text`), and treats special-token text as special (the standard, which chat templates
    need). `chat_template` (Jinja) is stored with it when given. -> the saved HF tokenizer."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    out = Path(out_dir)
    hf_tokenizer(tokenizer).save_pretrained(str(out))  # then reload it as a stand-alone copy
    tok = AutoTokenizer.from_pretrained(str(out), split_special_tokens=False)
    if tok.bos_token is not None:
        bos = (tok.bos_token, tok.bos_token_id)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos])
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out))
    return tok


def check_export_target(out: Path, overwrite: bool) -> None:
    """One line, before any work, when `out` is a file or a non-empty folder that is not an
    earlier export (unless `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file: name a folder for the Hugging Face export")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_RECORD).is_file() and not overwrite:
        raise ValueError(f"out={out} is a non-empty folder that is not an earlier export: name a new or "
                         "empty folder, or pass export.overwrite=true to replace its contents")


def _readable_like_the_rest(folder: Path) -> None:
    """Files as the umask allows (safetensors writes weights owner-only, 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """tmp -> out; an earlier `out` moves aside first and is deleted only once `out` is complete."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_hf(model: H64LMForCausalLM, tokenizer: Any, out_dir: Union[str, Path],
              max_shard_size: Union[int, str] = "2GB", *, overwrite: bool = False,
              record: Optional[Dict[str, Any]] = None, chat_template: Optional[str] = None,
              sequence_classification: bool = False) -> Dict[str, Any]:
    """Write config.json, model.safetensors (sharded with model.safetensors.index.json past
    `max_shard_size`), generation_config.json, the tokenizer files and EXPORT_RECORD (`record`,
    e.g. the checkpoint and step, plus the model's config) into `out_dir`, atomically.
    `sequence_classification`: the reward model (`model.score_head`) as a stock
    *ForSequenceClassification (sequence_classification.py), padding with `<unk>`; otherwise the
    causal LM, any score head left out.

    Returns {"out_dir", "architecture" (a stock family or h64lm), "trust_remote_code", "files"}."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    check_export_target(out, overwrite)
    check_exportable(model.config)
    tok = hf_tokenizer(tokenizer)
    if len(tok) > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} ids but model.vocab_size="
                         f"{model.config.vocab_size}: export the tokenizer the model was trained with")
    eos = tok.eos_token_id
    if sequence_classification:  # EOS is the token a classifier reads: it cannot be the pad id
        architecture = classifier_architecture(model.config)
        tok.pad_token = tok.unk_token
        hf = to_hf_sequence_classifier(model, tok.pad_token_id, architecture).eval()
    else:
        architecture = stock_architecture(model.config) or CUSTOM
        hf = to_hf_model(model).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id = (
        tok.bos_token_id, eos, pad)
    hf.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos,
                                            pad_token_id=pad)
    if architecture == CUSTOM:  # copies modeling/configuration_h64lm.py, writes auto_map
        hf.config.register_for_auto_class()
        hf.register_for_auto_class("AutoModelForCausalLM")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        export_tokenizer(tok, tmp, chat_template)
        info = {"architecture": architecture, "trust_remote_code": architecture == CUSTOM,
                **(record or {}), "model": dataclasses.asdict(model.config)}
        (tmp / EXPORT_RECORD).write_text(json.dumps(info, indent=1, default=str) + "\n")
        _readable_like_the_rest(tmp)
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out), "architecture": architecture,
            "trust_remote_code": architecture == CUSTOM,
            "files": sorted(p.name for p in out.iterdir())}
