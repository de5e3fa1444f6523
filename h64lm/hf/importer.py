"""Read a Hugging Face folder into H64LM: `train.init_from=hf:DIR`.

Accepted: the stock families of `stock.py` (Llama, Mistral, Mixtral, Qwen2-MoE, Qwen3-MoE,
Ernie 4.5 MoE, GLM-4.5 MoE) and our own custom format (`model_type: h64lm`). Stock folders load
through their transformers class (which converts legacy layouts); ours is read straight from its
safetensors, so no code from the folder runs.
A damaged folder (no or unreadable config.json, a missing or truncated weight file, a tensor of
the wrong shape) and an option our network does not have fail with one ValueError line naming
the file or the option.
"""

import json
import logging
import re
import struct
from pathlib import Path
from typing import Dict, List, Tuple, Union

import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM

from .stock import STOCK_ARCHITECTURES, from_stock_config, from_stock_state_dict

__all__ = ["import_hf", "import_hf_config", "load_hf_model", "read_config_json"]

Tensors = Dict[str, torch.Tensor]


def read_config_json(folder: Path) -> dict:
    """`folder/config.json` as a dict; ValueError in one line when it is missing or not a JSON object."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass a Hugging Face model folder (config.json + weights)")
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json: pass a Hugging Face model folder")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an object of settings")
    return raw


def _custom_config(raw: dict) -> H64LMConfig:
    moe = raw["moe_layer_ids"]
    return H64LMConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_kv_heads=raw["num_key_value_heads"], intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        num_experts=raw["num_local_experts"], num_experts_per_token=raw["num_experts_per_tok"],
        moe_layers=list(moe) if moe else "none", num_shared_experts=raw["num_shared_experts"],
        capacity_factor=raw["capacity_factor"], eval_capacity_factor=raw.get("eval_capacity_factor"),
        # None (our default: renormalise when k > 1) where the folder's choice equals the default
        router_norm_topk=(None if raw.get("norm_topk_prob", True) == (raw["num_experts_per_tok"] > 1)
                          else raw.get("norm_topk_prob", True)),
        max_position_embeddings=raw["max_position_embeddings"],
        position_encoding=raw["position_encoding"], rope_theta=raw["rope_theta"],
        sliding_window=raw["attention_window"], rms_norm_eps=raw["rms_norm_eps"],
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        initializer_range=raw["initializer_range"], qk_norm=raw.get("qk_norm", False),
        logit_softcap=raw.get("logit_softcap"), init=raw.get("weight_init", "normal"))


def import_hf_config(path: Union[str, Path]) -> H64LMConfig:
    """The H64LMConfig of a HF folder, from its config.json alone (no weights read)."""
    folder = Path(path).expanduser()
    raw = read_config_json(folder)
    model_type = raw.get("model_type")
    config_file = folder / "config.json"
    if model_type not in ("h64lm", *STOCK_ARCHITECTURES):
        raise ValueError(f"cannot import {folder}: model_type={model_type!r} is unsupported "
                         f"(supported: h64lm, {', '.join(STOCK_ARCHITECTURES)})")
    try:
        if model_type == "h64lm":
            config = _custom_config(raw)
        else:
            from transformers import AutoConfig

            config = from_stock_config(AutoConfig.from_pretrained(str(folder), local_files_only=True), model_type)
    except KeyError as e:
        raise ValueError(f"{config_file} lacks the setting {e}") from None
    except (TypeError, AttributeError, ValueError, OSError) as e:  # wrong types, out of range
        raise ValueError(f"{config_file}: {str(e).splitlines()[0]}") from None
    bias_rate = _recorded_model(folder).get("router_bias_update_rate")
    if bias_rate:  # a training setting our own exports record, so a continued run keeps it
        config.router_bias_update_rate = float(bias_rate)
    return config


def _recorded_model(folder: Path) -> dict:
    """The H64LMConfig fields an export of ours recorded (export.EXPORT_RECORD), else {}."""
    from .export import EXPORT_RECORD

    try:
        model = json.loads((folder / EXPORT_RECORD).read_text()).get("model", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return {}
    return model if isinstance(model, dict) else {}


def _weight_files(folder: Path) -> List[Path]:
    """The folder's safetensors files (one, or those its index lists), each checked complete:
    its header parses and its size is what the header's offsets say (a truncated copy is not)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a safetensors index (a JSON object with a weight_map)") from None
    else:
        files = ["model.safetensors"]
    paths = [folder / name for name in files]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{path} is missing" + (f" (listed in {index.name})" if index.exists()
                                                     else ": the folder has no weights"))
        _check_complete(path)
    return paths


def _check_complete(path: Path) -> None:
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError):
        raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    if 8 + header_len + end != size:
        raise ValueError(f"{path} is truncated or corrupt: {size} bytes, its header describes "
                         f"{8 + header_len + end}")


def _read_safetensors(folder: Path) -> Tensors:
    from safetensors.torch import load_file

    state: Tensors = {}
    for path in _weight_files(folder):
        state.update(load_file(str(path)))
    return state


class _Report(logging.Handler):
    """Holds transformers' multi-line load report instead of printing it: the error names a key."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage()

    def first_key(self) -> str:
        found = re.search(r"((?:model|lm_head)(?:\.(?:\w+|\{[^}]*\}))+)", self.text)
        return found.group(1) if found else "see transformers' load report"


def _read_stock(folder: Path) -> Tensors:
    """Through the transformers class, which also converts legacy layouts (e.g. Mixtral's
    per-expert w1/w2/w3 files)."""
    from transformers import AutoModelForCausalLM

    _weight_files(folder)
    report, logger = _Report(), logging.getLogger("transformers")  # every transformers logger's parent
    handlers, logger.handlers = logger.handlers, [report]
    try:
        hf, info = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype="auto",
                                                        output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        if report.text:  # transformers reported the tensors it could not place
            raise ValueError(f"{folder}'s weights do not match its config.json at {report.first_key()} "
                             "(a wrong shape or a missing tensor)") from None
        raise ValueError(f"{folder}'s weights do not load ({str(e).strip().splitlines()[0][:120]})") from None
    finally:
        logger.handlers = handlers
    wrong = [k for k in info.get("missing_keys", []) if not k.endswith("e_score_correction_bias")]
    wrong += [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])]
    if wrong:
        raise ValueError(f"{folder}'s weights do not match its config.json: missing or misshapen {sorted(wrong)[:3]}")
    return hf.state_dict()


def _check_shapes(state: Tensors, config: H64LMConfig, folder: Path) -> None:
    """Every tensor the config implies is present with its shape (compared on the meta device)."""
    with torch.device("meta"):
        expected = H64LMForCausalLM(config).state_dict()
    for name, tensor in expected.items():
        if name.endswith("router.bias"):
            continue  # optional: a selection bias only where the folder has one
        if name not in state:
            raise ValueError(f"{folder}'s weights lack {name}, which its config.json implies")
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{folder}'s {name} has shape {tuple(state[name].shape)}, its config.json "
                             f"implies {tuple(tensor.shape)}")


def import_hf(path: Union[str, Path]) -> Tuple[H64LMConfig, Tensors]:
    """A HF folder -> (H64LMConfig derived from its config.json, our state dict)."""
    folder = Path(path).expanduser()
    config = import_hf_config(folder)
    model_type = read_config_json(folder).get("model_type")
    hf_state = _read_safetensors(folder) if model_type == "h64lm" else _read_stock(folder)
    try:
        if model_type == "h64lm":
            state = {k.removeprefix("model."): v for k, v in hf_state.items()}
            state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))  # tied: saved once
        else:
            state = from_stock_state_dict(hf_state, config, model_type)
    except KeyError as e:
        raise ValueError(f"{folder}'s weights lack the tensor {e}") from None
    except (RuntimeError, ValueError) as e:  # a tensor that cannot be split as its config says
        raise ValueError(f"{folder}: {str(e).splitlines()[0]}") from None
    if any(k.endswith("router.bias") for k in state) and not config.router_bias_update_rate:
        config.router_bias_update_rate = 1e-3  # holds the bias; DeepSeek-V3's rate if training goes on
    _check_shapes(state, config, folder)
    return config, state


def load_hf_model(path: Union[str, Path], dtype: torch.dtype = torch.float32) -> H64LMForCausalLM:
    """`import_hf` + an H64LMForCausalLM holding the weights (eval mode, `dtype`)."""
    config, state = import_hf(path)
    model = H64LMForCausalLM(config)
    model.load_state_dict(state, strict=False)  # _check_shapes has checked every key
    return model.to(dtype).eval()
