from pathlib import Path

import pytest
from omegaconf import OmegaConf, ValidationError

from h64lm.data import DataConfig

CONF = Path(__file__).resolve().parents[2] / "conf" / "data"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_yaml_builds_a_valid_config(name):
    node = OmegaConf.load(CONF / f"{name}.yaml") or OmegaConf.create({})
    if name in ("text", "chat"):
        assert OmegaConf.is_missing(node, "path")  # the user must say which file
        node.path = "corpus.txt"
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), node))
    assert cfg.name == name and cfg.tokenizer == "mistral"


def test_schema_accepts_overrides():
    node = OmegaConf.structured(DataConfig)
    node.merge_with({"path": "a.jsonl", "max_samples": 10, "val_windows": None})
    with pytest.raises(ValidationError, match="seq_len"):
        node.seq_len = "long"
