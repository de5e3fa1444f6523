"""An offline task that measures something: small arithmetic word problems with exact-match scoring.

Every problem comes from one template family: a person, an object, two numbers and one operation

    Q: "Mia has 7 pens. She gets 5 more. How many pens does Mia have now?"
    A: "Mia starts with 7 pens and gets 5 more, so 7 + 5 = 12.\\n#### 12"

(GSM8K's answer layout: a worked step, then `#### N`). Numbers stay at or below `max_operand`
and every result is a non-negative integer, so a model of a few million parameters can learn the
task on a CPU in minutes and its accuracy still says whether fine-tuning worked.

The whole problem space is enumerated, shuffled with `seed` and cut into train / validation /
test slices, so the splits are disjoint by construction. `held_out="numbers"` cuts by the
(operation, a, b) triple instead: the test split then holds arithmetic facts never seen in
training under any name, a harder, generalisation-only test.

Files: `write_split(path, problems, fmt)` writes jsonl in the `gsm8k` (question/answer) or
`messages` format, both read by h64lm/data/sft_sources.py. `python -m h64lm.data.tasks.arithmetic
OUT_DIR` writes train/val/test files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "FORMATS",
    "Problem",
    "accuracy",
    "exact_match",
    "extract_answer",
    "make_splits",
    "write_split",
]

FORMATS = ("gsm8k", "messages")
HELD_OUT = ("problem", "numbers")
_NAMES = (("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Leo", "He"),
          ("Zoe", "She"), ("Sam", "He"), ("Eva", "She"), ("Max", "He"))
_OBJECTS = ("apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles")
# op: (question's middle sentence, solution's verb phrase, symbol, result)
_OPS = {
    "add": ("{p} gets {b} more.", "gets {b} more", "+", lambda a, b: a + b),
    "sub": ("{p} gives away {b}.", "gives away {b}", "-", lambda a, b: a - b),
    "mul": ("{p} gets {b} times as many.", "ends with {b} times as many", "*", lambda a, b: a * b),
}
_ANSWER = re.compile(r"####\s*(-?[\d,]*\d(?:\.\d+)?)")


@dataclass(frozen=True)
class Problem:
    name: str
    pronoun: str
    obj: str
    op: str
    a: int
    b: int

    @property
    def result(self) -> int:
        return _OPS[self.op][3](self.a, self.b)

    @property
    def question(self) -> str:
        middle = _OPS[self.op][0].format(p=self.pronoun, b=self.b)
        return (f"{self.name} has {self.a} {self.obj}. {middle} "
                f"How many {self.obj} does {self.name} have now?")

    @property
    def answer(self) -> str:
        verb, symbol = _OPS[self.op][1].format(b=self.b), _OPS[self.op][2]
        return (f"{self.name} starts with {self.a} {self.obj} and {verb}, so "
                f"{self.a} {symbol} {self.b} = {self.result}.\n#### {self.result}")


def _space(max_operand: int, ops: Sequence[str]) -> list[Problem]:
    """Every valid problem, in a fixed order: results stay >= 0, products small."""
    out = []
    for (name, pronoun), obj, op in itertools.product(_NAMES, _OBJECTS, ops):
        for a, b in itertools.product(range(1, max_operand + 1), repeat=2):
            if (op == "sub" and b > a) or (op == "mul" and (b > 5 or a * b > 4 * max_operand)):
                continue
            out.append(Problem(name, pronoun, obj, op, a, b))
    return out


def make_splits(seed: int = 0, sizes: tuple[int, int, int] = (20000, 500, 500),
                max_operand: int = 20, ops: Sequence[str] = ("add", "sub"),
                held_out: str = "problem") -> dict[str, list[Problem]]:
    """{"train", "val", "test"} disjoint lists of problems; the same for the same arguments."""
    unknown = [op for op in ops if op not in _OPS]
    if unknown or not ops:
        raise ValueError(f"arithmetic ops={list(ops)}: choose from {', '.join(_OPS)}")
    if held_out not in HELD_OUT:
        raise ValueError(f"arithmetic held_out={held_out!r}: choose from {', '.join(HELD_OUT)}")
    if max_operand < 1 or min(sizes) < 0:
        raise ValueError(f"arithmetic max_operand={max_operand} must be >= 1 and sizes={sizes} >= 0")
    space = _space(max_operand, ops)
    rng = np.random.default_rng(seed)
    if held_out == "problem":
        groups = [[p] for p in space]
    else:  # every problem sharing (op, a, b) goes to the same split
        by_key: dict[tuple, list[Problem]] = {}
        for p in space:
            by_key.setdefault((p.op, p.a, p.b), []).append(p)
        groups = list(by_key.values())
    order = iter(rng.permutation(len(groups)))
    out: dict[str, list[Problem]] = {}
    # val and test are filled first (their sizes are what an evaluation needs), train from the
    # rest; a group cut at a split's end leaves its remainder unused, never to another split
    for split, size in (("val", sizes[1]), ("test", sizes[2]), ("train", sizes[0])):
        out[split] = []
        while len(out[split]) < size:
            g = next(order, None)
            if g is None:
                raise ValueError(f"arithmetic: {len(space)} distinct problems are too few for "
                                 f"sizes={tuple(sizes)} (train, val, test); raise max_operand, add "
                                 "ops or ask for fewer")
            out[split].extend(groups[g][i] for i in rng.permutation(len(groups[g])))
        del out[split][size:]
    return {"train": out["train"], "val": out["val"], "test": out["test"]}


def _row(problem: Problem, fmt: str) -> dict:
    if fmt == "gsm8k":
        return {"question": problem.question, "answer": problem.answer}
    return {"messages": [{"role": "user", "content": problem.question},
                         {"role": "assistant", "content": problem.answer}]}


def write_split(path: str | Path, problems: Sequence[Problem], fmt: str = "gsm8k") -> Path:
    """One jsonl row per problem, in the `gsm8k` or `messages` format."""
    if fmt not in FORMATS:
        raise ValueError(f"arithmetic format={fmt!r}: choose from {', '.join(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(_row(p, fmt), ensure_ascii=False) + "\n")
    return path


def extract_answer(text: str) -> str | None:
    """The number after the last `####` (commas removed), or None when there is none."""
    found = _ANSWER.findall(text)
    return found[-1].replace(",", "") if found else None


def exact_match(generated: str, gold: str) -> bool:
    """True when the generated text's final answer equals the gold answer's (text or number)."""
    want = extract_answer(gold) if "####" in gold else gold.strip().replace(",", "")
    got = extract_answer(generated)
    return got is not None and want is not None and got == want


def accuracy(generated: Sequence[str], golds: Sequence[str]) -> float:
    if len(generated) != len(golds) or not golds:
        raise ValueError(f"accuracy needs as many generations ({len(generated)}) as gold answers "
                         f"({len(golds)}), at least one")
    return sum(exact_match(g, t) for g, t in zip(generated, golds)) / len(golds)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the arithmetic task's splits as jsonl.")
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=int, nargs=3, default=(20000, 500, 500),
                        metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--max-operand", type=int, default=20)
    parser.add_argument("--ops", nargs="+", default=["add", "sub"], choices=list(_OPS))
    parser.add_argument("--held-out", default="problem", choices=HELD_OUT)
    parser.add_argument("--format", default="gsm8k", choices=FORMATS)
    args = parser.parse_args(argv)
    splits = make_splits(args.seed, tuple(args.sizes), args.max_operand, args.ops, args.held_out)
    for name, problems in splits.items():
        path = write_split(Path(args.out_dir) / f"{name}.jsonl", problems, args.format)
        print(f"{path}: {len(problems)} problems")


if __name__ == "__main__":
    main()
