"""The layer order of h64lm/: a module imports only its own package or packages of lower layers.

Read from the source with `ast`, so every import counts: module level, inside a function, under
`if TYPE_CHECKING:`. Packages of one layer are peers and import none of each other. A new
top-level package or module must be given a layer here before its imports are accepted.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. Each entry: (layer name, its units: top-level packages or modules of h64lm).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("h64lm", "h64lm.validation", "h64lm.plotting", "h64lm.cpu_threads", "h64lm.cpu_malloc")),
    ("model/data", ("h64lm.model", "h64lm.data")),
    ("config", ("h64lm.config",)),  # RunConfig composes the model's and the data's schemas
    ("parallel/objectives/hf", ("h64lm.parallel", "h64lm.objectives", "h64lm.hf")),
    ("optim", ("h64lm.optim",)),  # Muon's matrix layouts know the model's and EP's modules
    ("runtime", ("h64lm.runtime",)),  # checkpoints rebuild a legacy file's optimizer
    ("eval/plan", ("h64lm.eval", "h64lm.plan")),
    ("train", ("h64lm.train",)),
    ("modes", ("h64lm.modes",)),
    ("cli", ("h64lm.cli",)),
]


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the scanned root
    line: int
    imported: str  # the module named by the import
    source_layer: str
    target_layer: str

    def __str__(self) -> str:
        return (f"{self.path}:{self.line} imports {self.imported}: layer {self.source_layer!r} may not "
                f"import layer {self.target_layer!r} (same or higher in tests/test_layers.py LAYERS)")


def module_name(root: Path, file: Path) -> str:
    parts = file.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str, root: Path) -> str:
    """h64lm.train.loop -> h64lm.train; h64lm -> h64lm; a name under the root package that is not
    a module (`from h64lm import __version__`) belongs to the root."""
    parts = module.split(".")
    if len(parts) == 1:
        return module
    unit = ".".join(parts[:2])
    pkg = root / parts[0] / parts[1]
    return unit if pkg.is_dir() or pkg.with_suffix(".py").exists() else parts[0]


def imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the tree; `from pkg import name` also yields
    pkg.name, which is what it names when `name` is a module."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path, package: str = "h64lm", layers=LAYERS) -> tuple[list[Violation], list[str]]:
    """-> (upward or sideways imports, modules whose unit has no layer)."""
    tier = {unit: (i, name) for i, (name, units) in enumerate(layers) for unit in units}
    found: list[Violation] = []
    unplaced: set[str] = set()
    for file in sorted((root / package).rglob("*.py")):
        module = module_name(root, file)
        source = unit_of(module, root)
        if source not in tier:
            unplaced.add(f"{file.relative_to(root)} (unit {source})")
            continue
        tree = ast.parse(file.read_text(), filename=str(file))
        seen = set()
        for line, imported in imports(tree, module, file.name == "__init__.py"):
            if imported.split(".")[0] != package:
                continue
            target = unit_of(imported, root)
            if target == source or (line, target) in seen:
                continue
            seen.add((line, target))
            if target not in tier:
                unplaced.add(f"{imported} (unit {target})")
            elif tier[target][0] >= tier[source][0]:
                found.append(Violation(file.relative_to(root).as_posix(), line, imported, tier[source][1],
                                       tier[target][1]))
    return found, sorted(unplaced)


def test_every_import_goes_down_the_layers():
    found, unplaced = violations(ROOT)
    assert not unplaced, "give these a layer in tests/test_layers.py LAYERS: " + "; ".join(unplaced)
    assert not found, "imports against the layer order:\n" + "\n".join(map(str, found))


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in {"h64lm/__init__.py": "", **files}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_an_injected_upward_import_is_caught_with_file_line_and_layers(tmp_path):
    root = _tree(tmp_path, {
        "h64lm/model/__init__.py": "",
        "h64lm/model/block.py": "import torch\n\n\ndef f():\n    from h64lm.train.loop import Trainer\n",
        "h64lm/train/__init__.py": "",
        "h64lm/train/loop.py": "from h64lm.model.block import f\nfrom . import loop\n",
    })
    found, unplaced = violations(root)
    assert unplaced == []
    assert found == [Violation("h64lm/model/block.py", 5, "h64lm.train.loop", "model/data", "train")]
    assert "h64lm/model/block.py:5" in str(found[0]) and "'model/data'" in str(found[0])


def test_peers_relative_imports_and_unplaced_packages(tmp_path):
    root = _tree(tmp_path, {
        "h64lm/hf/__init__.py": "from h64lm import parallel\n",  # a peer, named as `from pkg import mod`
        "h64lm/parallel/__init__.py": "",
        "h64lm/eval/__init__.py": "from ..hf import export\nfrom .local import x\n",  # relative, downward
        "h64lm/newthing/__init__.py": "from h64lm import model\n",
    })
    found, unplaced = violations(root)
    assert [(v.path, v.line, v.target_layer) for v in found] == \
        [("h64lm/hf/__init__.py", 1, "parallel/objectives/hf")]
    assert unplaced == ["h64lm/newthing/__init__.py (unit h64lm.newthing)"]


def test_every_layer_unit_exists():
    paths = [ROOT / u.replace(".", "/") for _, units in LAYERS for u in units]
    missing = [p.relative_to(ROOT).as_posix() for p in paths if not (p.is_dir() or p.with_suffix(".py").exists())]
    assert not missing, f"LAYERS names units that no longer exist: {missing}"
