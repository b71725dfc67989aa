"""The package's shape: imports point one way (docs/architecture.md), no cycles, no private names
across modules, every module importable in a fresh interpreter, configs shipped as package data."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lqlr"
# lower layers never import higher ones (same layer: allowed, as long as there is no cycle)
LAYERS = {"config": 0, "assets": 0, "util": 0, "core": 1, "nn": 2, "calibrate": 3, "budget": 4, "io": 5,
          "engine": 6, "eval": 7, "finetune": 8, "cli": 9, "bench": 10, "": 10}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(ROOT.rglob("*.py")):
        parts = ["lqlr", *p.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def imports(path: Path, module: str, top_only: bool):
    """(imported lqlr module, imported names, line) of every lqlr import in ``path``."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    is_pkg = path.name == "__init__.py"
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name == "lqlr" or name.startswith("lqlr."):
                yield name, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lqlr"):
                    yield a.name, [], node.lineno


def resolve(target: str, names: list[str], mods: dict) -> list[str]:
    """The lqlr modules an import statement really depends on (``from pkg import submodule``)."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
    return subs if subs and len(subs) == len(names) else [target]


def test_imports_point_one_way():
    mods = modules()
    bad = []
    for m, p in mods.items():
        for target, names, line in imports(p, m, top_only=False):
            for t in resolve(target, names, mods):
                if t in mods and layer(t) > layer(m):
                    bad.append(f"{p.relative_to(ROOT.parent)}:{line} ({m}, layer {layer(m)}) imports {t} (layer {layer(t)})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = modules()
    graph = {m: {t for target, names, _ in imports(p, m, top_only=True) for t in resolve(target, names, mods)
                 if t in mods and t != m} for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not a cycle through the package
    for m in graph:
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    seen, stack, cycles = {}, [], []

    def visit(m):
        seen[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if seen.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = "done"

    for m in graph:
        if m not in seen:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    mods = modules()
    bad = [f"{p.relative_to(ROOT.parent)}:{line} imports {n} from {t}"
           for m, p in mods.items() for t, names, line in imports(p, m, top_only=False)
           for n in names if n.startswith("_") and t != m and n != "__version__"]
    assert not bad, "\n".join(bad)


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(modules())
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    for k in [k for k in sys.modules if k == 'lqlr' or k.startswith('lqlr.')]:\n"
            "        del sys.modules[k]\n"
            "    importlib.import_module(name)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_library_never_imports_hydra():
    mods = modules()
    bad = []
    for m, p in mods.items():
        if m.startswith(("lqlr.cli", "lqlr.bench")):
            continue
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{m}: {n}" for n in names if n.split(".")[0] in ("hydra", "omegaconf")]
    assert not bad, bad


@pytest.mark.parametrize("group", ["model", "data", "method", "budget", "experiment"])
def test_configs_are_package_data(group):
    folder = ROOT / "cli" / "configs" / group
    assert sorted(folder.glob("*.yaml")), f"no YAML in {folder}"
