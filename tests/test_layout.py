"""The layout's promises: light imports at the bottom, one direction of dependency, and tests that drive public
seams only (no private names of the library, no monkeypatching of its internals)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "facenet_hf"
HEAVY = ("torch", "torchvision", "datasets", "pyarrow", "timm", "accelerate", "matplotlib")


def _imported_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nimport json\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "statement",
    [
        "import facenet_hf.config",
        "import facenet_hf.constants",
        "from facenet_hf.config import load_config; load_config(None, ['data.lfw_dir=/x', 'data.pairs=/p'])",
        "from facenet_hf.cli import main; main(['--help'])",
        "import facenet_hf.evaluation",
        "import facenet_hf.faces",
        "import facenet_hf.faces.tree",
    ],
)
def test_light_modules_import_no_heavy_stack(statement):
    assert _imported_after(statement) == []


# Layers, bottom first: a module may import only from its own layer or the ones below it.
LAYERS = [
    {"constants", "validation", "fileio", "distances", "config"},
    {"data", "losses", "faces"},
    {"model"},
    {"evaluation", "hub"},
    {"apps", "export"},
    {"training"},
    {"cli"},
]


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"facenet_hf.{top} is in no layer of this test: add it to LAYERS")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_imports_go_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        if name == "facenet_hf":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("facenet_hf."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("facenet_hf.")]
            for target in targets:
                if _layer(target) > _layer(name):
                    wrong.append(f"{name} imports {target} (line {node.lineno})")
    assert wrong == []


# The one place a test may patch the library: the disk filling up while a checkpoint manifest is written (the
# failure is injected into checkpoint.finalize, a public function, to leave half a manifest behind).
ALLOWED_PATCHES = {("test_robustness.py", "checkpoint", "finalize")}


def _library_names(tree: ast.Module) -> set[str]:
    """Names a test file binds to facenet_hf modules or objects."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "facenet_hf":
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {
                (a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("facenet_hf")
            }
    return names


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    library = _library_names(tree)
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("facenet_hf"):
            found += [f"{where} imports private {a.name}" for a in node.names if _private(a.name)]
        elif (
            isinstance(node, ast.Attribute)
            and _private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in library
        ):
            found.append(f"{where} uses {node.value.id}.{node.attr}")
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    owner = target.value.id
                    if owner in library or (_private(target.attr) and owner not in ("self", "cls")):
                        found.append(f"{where} assigns {owner}.{target.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "setattr"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "monkeypatch"
            and node.args
        ):
            target = node.args[0]
            attr = (
                node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else "?"
            )
            if isinstance(target, ast.Constant) and str(target.value).startswith("facenet_hf"):
                found.append(f"{where} monkeypatches {target.value}")
            elif (
                isinstance(target, ast.Name)
                and target.id in library
                and (path.name, target.id, attr) not in ALLOWED_PATCHES
            ):
                found.append(f"{where} monkeypatches {target.id}.{attr}")
    return found


def test_tests_use_public_seams_only():
    found = [v for path in sorted((ROOT / "tests").glob("*.py")) for v in _violations(path)]
    assert found == []


def test_the_seam_check_catches_what_it_should(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text(
        "from facenet_hf.training.engine import _train\n"
        "import facenet_hf.training.engine as engine\n"
        "from facenet_hf.losses import TripletLoss\n"
        "engine.train_step = None\n"
        "loss._semihard_dense = True\n"
        "def test(monkeypatch):\n"
        "    monkeypatch.setattr(engine, 'TripletLoss', object)\n"
        "    TripletLoss._forward(None)\n"
    )
    kinds = [v.split(" ", 1)[1].split(" ")[0] for v in _violations(bad)]
    assert sorted(kinds) == ["assigns", "assigns", "imports", "monkeypatches", "uses"]
