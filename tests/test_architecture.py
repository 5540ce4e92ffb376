"""The package layering of docs/ARCHITECTURE.md holds: a package imports only packages of lower
layers (at module level or inside functions alike), so no import cycle can hide behind a deferred
import."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "lina"

#: lowest first; a package may import from any earlier layer; the last layer may import anything
LAYERS = [
    {"lina", "errors", "extras"},
    {"npz_io", "policy", "devices", "obs", "emulation_spec"},
    {"data", "cluster"},
    {"placement", "config"},
    {"comm"},
    {"moe"},
    {"models", "hf", "devicetime"},
    {"train"},
    {"infer"},
    {"sim", "serve"},
    {"testing"},
    {"bench", "commands", "cli", "__main__"},
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0] if len(rel.parts) > 1 else rel.parts[0]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module == "lina" or node.module.startswith("lina."))
        ):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else "lina")
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lina.")}
    return found


def test_every_package_has_a_layer():
    packages = {_package(p) for p in ROOT.rglob("*.py")} - {"__init__"}
    assert packages <= set(RANK), sorted(packages - set(RANK))


def test_no_package_imports_upward():
    upward = []
    for path in ROOT.rglob("*.py"):
        pkg = _package(path)
        if pkg == "__init__" or RANK.get(pkg) == len(LAYERS) - 1:
            continue
        for target in _imports(path) - {pkg}:
            if RANK.get(target, 0) >= RANK[pkg]:
                upward.append(f"{path.relative_to(ROOT)} imports lina.{target}")
    assert not upward, "\n".join(sorted(upward))
