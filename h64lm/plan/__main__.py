"""python -m h64lm.plan model=moe_7b gpus=8 gpu_mem_gb=80 [seq_len=... micro_batch=... ...]

`model` is a preset name (conf/model/NAME.yaml); `model.KEY=VALUE` overrides one of its keys.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from h64lm.model.config import H64LMConfig

from .layouts import DEFAULT_HEADROOM, plan_layouts
from .report import format_plan

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
# key -> (type, default); seq_len null = the preset's max_position_embeddings
OPTIONS = {"model": (str, "moe_7b"), "gpus": (int, 8), "gpu_mem_gb": (float, 80.0),
           "seq_len": (int, None), "micro_batch": (int, 1), "grad_accum": (int, 1),
           "precision": (str, "bf16"), "peak_tflops": (float, 989.0), "mfu": (float, 0.4),
           "headroom": (float, DEFAULT_HEADROOM)}


def load_preset(name: str, overrides: dict) -> H64LMConfig:
    path = CONF / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"model={name!r} must be one of "
                         f"{', '.join(sorted(p.stem for p in CONF.glob('*.yaml')))}")
    fields = yaml.safe_load(path.read_text()) or {}  # a preset holds only what differs from the defaults
    return H64LMConfig(**{**fields, **overrides})


def parse(argv: list[str]) -> tuple[dict, dict]:
    args = {k: default for k, (_, default) in OPTIONS.items()}
    model_overrides = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"argument {item!r} must be KEY=VALUE (keys: {', '.join(OPTIONS)})")
        if key.startswith("model."):
            model_overrides[key[len("model."):]] = yaml.safe_load(value)
        elif key in OPTIONS:
            args[key] = OPTIONS[key][0](value)
        else:
            raise ValueError(f"unknown key {key!r}: use one of {', '.join(OPTIONS)} or model.KEY")
    return args, model_overrides


def main(argv: list[str]) -> int:
    try:
        args, overrides = parse(argv)
        config = load_preset(args["model"], overrides)
        seq_len = args["seq_len"] or config.max_position_embeddings
        layouts = plan_layouts(config, gpus=args["gpus"], seq_len=seq_len,
                               micro_batch=args["micro_batch"], grad_accum=args["grad_accum"],
                               precision=args["precision"], peak_tflops=args["peak_tflops"],
                               mfu=args["mfu"], gpu_mem_gb=args["gpu_mem_gb"],
                               headroom=args["headroom"])
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(layouts, args["model"], args["gpu_mem_gb"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
