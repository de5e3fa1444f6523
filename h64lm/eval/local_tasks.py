"""Small offline lm-eval tasks built from a corpus's validation text (the hub is unreachable).

- `h64lm_lastword`: LAMBADA-style; a passage without its last word, scored on that word
  (`loglikelihood`: accuracy of greedy decoding and perplexity).
- `h64lm_cloze`: the passage's last word against 3 other words of the text (`multiple_choice`:
  acc, acc_norm).
- `h64lm_rolling`: whole passages (`loglikelihood_rolling`: word/byte perplexity, bits per byte).
"""

import json
import random
import re
from pathlib import Path
from typing import Dict, List, Union

__all__ = ["LOCAL_TASKS", "build_local_tasks", "passages"]

LOCAL_TASKS = ("h64lm_lastword", "h64lm_cloze", "h64lm_rolling")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def passages(text: str, min_words: int = 12, max_words: int = 40) -> List[str]:
    """Sentences of `min_words`..`max_words` words ending in a plain alphabetic word, with
    WikiText's spaced punctuation (" , ", " .") joined back; none with <unk> or @-@ marks."""
    flat = re.sub(r" ([.,;:!?)'])", r"\1", " ".join(text.split())).replace("( ", "(")
    found = []
    for sentence in re.split(r"(?<=[.!?])\s+", flat):
        words = sentence.rstrip(".!?").split(" ")
        clean = "@" not in sentence and "<unk>" not in sentence
        if clean and min_words <= len(words) <= max_words and _WORD.match(words[-1]):
            found.append(" ".join(words))
    return found


def _yaml(task: str, data: Path, body: str) -> str:
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {json.dumps(str(data))}\ntest_split: test\n{body}")


_BODIES = {
    "h64lm_lastword": (
        'output_type: loglikelihood\ndoc_to_text: "{{context}}"\n'
        "doc_to_target: \"{{' ' + target}}\"\nmetric_list:\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"),
    "h64lm_cloze": (
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\nmetric_list:\n'
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"),
    "h64lm_rolling": (
        'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n"
        "  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"),
}


def build_local_tasks(val_text: str, out_dir: Union[str, Path], n: int = 100,
                      seed: int = 0) -> Dict[str, Union[str, List[str]]]:
    """Write `n` examples per task (JSONL) and their YAMLs under `out_dir`.

    Returns {"include_path": out_dir (pass to lm-eval), "tasks": LOCAL_TASKS}."""
    found = passages(val_text)
    if len(found) < n:
        raise ValueError(f"the validation text has {len(found)} usable sentences, fewer than "
                         f"n={n}: pass more text or a smaller n")
    rng = random.Random(seed)
    chosen = rng.sample(found, n)
    vocabulary = sorted({w for p in found for w in p.split(" ") if _WORD.match(w)})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: Dict[str, List[dict]] = {task: [] for task in LOCAL_TASKS}
    for passage in chosen:
        context, target = passage.rsplit(" ", 1)
        rows["h64lm_lastword"].append({"context": context, "target": target})
        distractors = rng.sample([w for w in vocabulary if w != target], 3)
        label = rng.randrange(4)
        choices = distractors[:label] + [target] + distractors[label:]
        rows["h64lm_cloze"].append({"context": context, "choices": [" " + c for c in choices],
                                    "label": label})
        rows["h64lm_rolling"].append({"text": passage + "."})
    for task in LOCAL_TASKS:
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[task]))
        (out / f"{task}.yaml").write_text(_yaml(task, data, _BODIES[task]))
    return {"include_path": str(out), "tasks": list(LOCAL_TASKS)}
