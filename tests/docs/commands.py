"""Every fenced `bash` command of README.md and docs/*.md, and how a test runs it small.

A command is a line of a ```bash block (a line ending in `\\` continues on the next; `#` starts a
comment). An HTML comment `<!-- needs: gpu, torchrun -->` on the line before the block's opening
fence, or after its closing fence, says what the command needs as written: such a command is
checked (its overrides composed, its script's arguments parsed), and only executed when nothing it
needs is out of reach here (`minutes` and `hours` are in reach: the test cuts the work short).
Executing a command means running it with small overrides appended (`small_overrides`) in a
scratch folder, after the commands whose outputs it reads (`producers`).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOT", "DOCS", "DocCommand", "doc_commands", "NEEDS", "UNREACHABLE", "required_needs",
           "run_py_args", "is_multirun", "kind", "small_overrides", "sweep_axes", "cut_sweep", "outputs",
           "producers", "first_of_each_kind"]

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# What a command may need; the first group is out of reach of a 2-core CPU machine without network.
UNREACHABLE = {"gpu", "torchrun", "network", "slurm", "several nodes"}
NEEDS = UNREACHABLE | {"minutes", "hours"}
_MARKER = re.compile(r"<!--\s*needs:\s*(.*?)\s*-->")


@dataclass(frozen=True)
class DocCommand:
    file: str  # repository-relative
    line: int  # 1-based line of the command's first line
    argv: tuple[str, ...]  # shell words, comment removed; `a && b` is two commands
    needs: frozenset[str]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {shlex.join(self.argv)}"


def _marker(line: str) -> set[str] | None:
    m = _MARKER.search(line)
    return None if m is None else {n.strip() for n in m.group(1).split(",") if n.strip()}


def doc_commands(paths=DOCS, root: Path = ROOT) -> list[DocCommand]:
    """The commands in document order (README first, then docs/ by name)."""
    found = []
    for path in paths:
        lines = path.read_text().splitlines()
        rel = path.relative_to(root).as_posix()
        i = 0
        while i < len(lines):
            if lines[i].strip() != "```bash":
                i += 1
                continue
            start = i
            i += 1
            block = []
            while lines[i].strip() != "```":
                block.append((i + 1, lines[i]))
                i += 1
            before = _marker(lines[start - 1]) if start > 0 else None
            after = _marker(lines[i + 1]) if i + 1 < len(lines) else None
            needs = frozenset((before or set()) | (after or set()))
            joined, first = "", None
            for number, text in block:
                first = first or number
                if text.rstrip().endswith("\\"):
                    joined += text.rstrip()[:-1] + " "
                    continue
                words = shlex.split(joined + text, comments=True)
                joined, line_no, first = "", first, None
                while words:
                    cut = words.index("&&") if "&&" in words else len(words)
                    found.append(DocCommand(rel, line_no, tuple(words[:cut]), needs))
                    words = words[cut + 1:]
            i += 1
    return found


def run_py_args(cmd: DocCommand) -> list[str] | None:
    """The arguments after `run.py` (python or torchrun), or None for other commands."""
    argv = list(cmd.argv)
    if "run.py" not in argv or not (argv[0].startswith("python") or argv[0] == "torchrun"):
        return None
    return argv[argv.index("run.py") + 1:]


def is_multirun(args: list[str]) -> bool:
    return "-m" in args or "--multirun" in args


def _overrides(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--cfg":
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def _value(overrides: list[str], key: str) -> str | None:
    for o in overrides:
        if o.split("=", 1)[0].lstrip("+~") == key:
            return o.split("=", 1)[1] if "=" in o else None
    return None


def required_needs(cmd: DocCommand) -> set[str]:
    """What the command visibly needs, which its marker must say."""
    text = " ".join(cmd.argv)
    need = set()
    if cmd.argv[0] == "torchrun":
        need.add("torchrun")
    if re.search(r"hardware=gpu|hardware\.device=cuda|--device cuda", text):
        need.add("gpu")
    if re.search(r"data=wikitext|\bpip install\b|^lm_eval\b|hellaswag|arc_easy", text):
        need.add("network")
    if "hydra/launcher=slurm" in text:
        need.add("slurm")
    args = run_py_args(cmd)
    long = args is not None and is_multirun(args)
    if long or re.search(r"experiments/(bench\w*|faults|gpu_check)\.|-m pytest", text):
        need.add("minutes")
    if (need | cmd.needs) & UNREACHABLE:  # not run here at all: how long it takes does not matter
        need.discard("minutes")
    return need


def kind(cmd: DocCommand) -> str:
    """What a command exercises; one of each kind runs in the default test run."""
    args = run_py_args(cmd)
    if args is None:
        argv = list(cmd.argv)
        script = next((a for a in argv if a.startswith("experiments/")), None)
        return f"script {script}" if script else " ".join(argv[:2])
    if cmd.argv[0] == "torchrun":
        return "torchrun"
    if "--cfg" in args:
        return "print config"
    if is_multirun(args):
        return "multirun"
    overrides = _overrides(args)
    for key in ("train.resume", "train.init_from"):
        if _value(overrides, key) is not None:
            return key
    return f"mode={_value(overrides, 'mode') or 'train'}"


def small_overrides(args: list[str], corpus: Path) -> list[str]:
    """What a test appends to run `run.py args` in seconds: a short local corpus (`corpus` and
    val.txt beside it) instead of the default one, windows of 32 tokens, 2 sequences per step,
    2 steps (4 when resuming, so a resume has steps left), no logger, one CPU thread. A key the
    command sets itself is left alone, except the sizes."""
    overrides = _overrides(args)
    resuming = _value(overrides, "train.resume") is not None
    forced = {"train.max_steps": "4" if resuming else "2", "train.batch_size": "2", "train.grad_accum": "1",
              "data.seq_len": "32", "eval.limit": "4", "eval.local_examples": "8", "gen.max_new_tokens": "4"}
    optional = {"data.val_windows": "4", "train.eval_every": "2", "train.save_every": "2",
                "train.sample_tokens": "4", "optim.warmup_steps": "1", "hardware": "cpu",
                "hardware.num_threads": "1", "logger": "none"}
    if "pipeline" in (_value(overrides, "mode"), _value(overrides, "experiment")):
        # every stage takes these; each stage keeps its own data (data= belongs to one stage)
        optional |= {"pipeline.until": "sft", "stage.eval_examples": "2",
                     "pipeline.eval_overrides": "[data=arithmetic,stage.eval_examples=2,stage.eval_max_new_tokens=4]"}
        forced |= {"data.seq_len": "96", "stage.eval_max_new_tokens": "4"}
        forced.pop("eval.limit"), forced.pop("eval.local_examples"), forced.pop("gen.max_new_tokens")
    elif "sft" in (_value(overrides, "stage"), _value(overrides, "experiment")):
        # conversations of the arithmetic task (~60 tokens each), not the text corpus; few test problems
        optional |= {"data": "arithmetic", "data.max_samples": "200", "stage.eval_examples": "2"}
        forced |= {"data.seq_len": "96", "stage.eval_max_new_tokens": "4"}
    elif _value(overrides, "data") is None:
        optional |= {"data": "text", "data.path": str(corpus), "data.val_path": str(corpus.with_name("val.txt"))}
    return ([f"{k}={v}" for k, v in optional.items() if _value(overrides, k) is None]
            + [f"{k}={v}" for k, v in forced.items()])


def _values(spec: str) -> list[str]:
    m = re.fullmatch(r"range\((.*)\)", spec)
    if m:
        start, stop, step = (float(x) for x in m.group(1).split(","))
        out, x = [], start
        while x < stop - 1e-12:
            out.append(repr(round(x, 12)))
            x += step
        return out
    return [v.strip() for v in spec.split(",")]


def sweep_axes(overrides: list[str], preset_params: dict) -> dict[str, list[str]]:
    """The multirun's axes and their values: the preset's `hydra.sweeper.params`, replaced or
    extended by the command line's comma lists and ranges."""
    axes = {k: _values(str(v)) for k, v in preset_params.items()}
    for o in overrides:
        key, _, spec = o.partition("=")
        if key in axes or "," in spec or spec.startswith("range("):
            axes[key] = _values(spec)
    return axes


def cut_sweep(axes: dict[str, list[str]]) -> list[str]:
    """Overrides that cut the sweep to at most 2 jobs: the first axis keeps two values, every
    other axis its first."""
    out = []
    for i, (key, values) in enumerate(axes.items()):
        kept = values[:2] if i == 0 else values[:1]
        out.append(f"{key}={','.join(kept)}")
    return out


def outputs(cmd: DocCommand) -> list[str]:
    """Paths the command creates that later commands may name: its run directory, its `out=`
    folder, its sweep's folder."""
    args = run_py_args(cmd)
    if args is None:
        return []
    overrides = _overrides(args)
    found = [v for v in (_value(overrides, "hydra.run.dir"), _value(overrides, "out")) if v]
    experiment = _value(overrides, "experiment")
    if is_multirun(args) and experiment:
        found.append(f"multirun/{experiment}/")
    return found


def producers(cmd: DocCommand, commands: list[DocCommand]) -> list[DocCommand]:
    """The earlier commands of the same file whose outputs `cmd` reads, recursively, in order."""
    text = " ".join(cmd.argv)
    args = run_py_args(cmd) or []
    resumes = _value(_overrides(args), "train.resume") == "auto"  # continues its own run directory
    own = set() if resumes else set(outputs(cmd))
    earlier = [c for c in commands if c.file == cmd.file and c.line < cmd.line]
    needed = []
    for c in reversed(earlier):
        made = [p for p in outputs(c) if p not in own and p in text]
        if made:
            needed = producers(c, commands) + [c] + needed
            own |= set(made)
    seen, ordered = set(), []
    for c in needed:
        if c not in seen:
            seen.add(c)
            ordered.append(c)
    return ordered


def first_of_each_kind(commands: list[DocCommand]) -> list[DocCommand]:
    """The first executable command of each kind that runs in seconds, in document order.
    Multiruns and the printed config are Hydra's own work, left to the slow run."""
    chosen, kinds = [], set()
    for c in commands:
        if c.needs or kind(c) in ("multirun", "print config") or kind(c).startswith("script"):
            continue
        if kind(c) not in kinds:
            kinds.add(kind(c))
            chosen.append(c)
    return chosen
