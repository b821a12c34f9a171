"""The layers import one way (DESIGN.md): a test, so the architecture stays what the folders say."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vaetool"

# What each layer may import from inside vaetool (besides itself); top-level modules are named by file.
ALLOWED = {
    "errors": set(), "config": {"errors"}, "events": set(),
    "models": {"config", "errors"},
    "io": {"config", "errors", "events"},
    "checkpoint": {"io", "models", "config", "errors"},
    "runtime": {"errors", "config"},
    "training": {"models", "io", "checkpoint", "config", "errors", "events", "runtime"},
    "inference": {"models", "io", "checkpoint", "config", "errors", "events", "runtime"},
    "api": {"models", "io", "checkpoint", "config", "errors", "events", "runtime", "inference", "training"},
    "cli": {"api", "training", "inference", "events", "errors", "config"},
    "__init__": {"api"}, "__main__": {"cli"},
}


def _layer(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_layers(path: Path) -> set[str]:
    """The vaetool layers a module imports, at top level or inside functions."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # ('vaetool', 'io')
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[:1] != ["vaetool"]:
                continue
            if len(target) == 1:  # from vaetool import x / from . import x
                found |= {alias.name for alias in node.names}
            else:
                found.add(target[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "vaetool" and len(parts) > 1:
                    found.add(parts[1])
    return found - {"__version__"}


def test_layers_import_one_way():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        allowed = ALLOWED[layer] | {layer}
        for other in sorted(_imported_layers(path) - allowed):
            problems.append(f"{path.relative_to(PACKAGE)} ({layer}) imports {other}")
    assert not problems, "\n".join(problems)


def test_models_never_touch_processes_files_or_printing():
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        text = path.read_text()
        for word in ("torch.distributed", "print(", "open(", "sys.exit"):
            assert word not in text, f"{path.name} uses {word}"


def test_every_layer_is_known():
    assert {_layer(p) for p in PACKAGE.rglob("*.py")} <= set(ALLOWED)
