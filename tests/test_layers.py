"""The package's layers: every import, lazy ones included, points to the same layer or below.

A newcomer reads trainer/ bottom-up (config -> method -> engine -> export -> evaluation -> tools),
and can trust that a lower layer never depends on a higher one. This test reads the imports
with `ast` (nothing is executed), so it also covers imports inside functions.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module belongs to the longest prefix listed here.
LAYERS = [
    ("trainer", "trainer.config", "trainer.resources", "trainer.compat", "trainer.ds_configs"),
    ("trainer.method",),
    ("trainer.engine",),
    ("trainer.export",),
    ("trainer.evaluation",),
    ("trainer.readapt", "trainer.demo"),
    ("trainer.bench",),
    ("trainer.planner",),
    ("trainer.__main__",),
]


def layer_of(module: str) -> int:
    best, level = "", None
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, level = name, i
    assert level is not None, f"{module}: not in any layer of tests/test_layers.py"
    return level


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import of a first-party module in `path`."""
    name = module_name(path)
    return imports_of(path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0])


def imports_of(source: str, package: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from ..engine import dist`: a name may itself be a module; known_module cuts it back if not.
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, n) for line, n in out if n.split(".")[0] in ("trainer", "data_prep")]


def known_module(name: str) -> str:
    """`trainer.engine.dist` stays; `trainer.engine.dist.free_port` (a name, not a module) is cut back."""
    parts = name.split(".")
    while parts:
        p = ROOT.joinpath(*parts)
        if p.with_suffix(".py").is_file() or (p / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return name


def test_every_module_is_in_a_layer():
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        layer_of(module_name(path))


def test_imports_run_downward_only():
    upward = []
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        here = module_name(path)
        for line, target in imported_modules(path):
            if target.startswith("data_prep"):
                continue  # the data pipeline is a separate package below everything (checked next)
            target = known_module(target)
            if layer_of(target) > layer_of(here):
                upward.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {target}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_data_prep_does_not_import_trainer():
    found = [f"{p.relative_to(ROOT)}:{line}: {t}" for p in sorted((ROOT / "data_prep").rglob("*.py"))
             for line, t in imported_modules(p) if t.startswith("trainer")]
    assert not found, found


def test_the_checker_sees_an_upward_import():
    """The rule can fail: a method module importing the engine, lazily, is an upward import."""
    source = "def f():\n    from ..engine import dist\n    from ..config import MethodConfig\n"
    imports = [known_module(t) for _, t in imports_of(source, "trainer.method")]
    assert imports == ["trainer.engine.dist", "trainer.config"]
    assert layer_of(imports[0]) > layer_of("trainer.method.extend") > layer_of(imports[1])
