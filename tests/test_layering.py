"""The import layering of maskkit (docs/architecture.md): a module imports only from its own layer
or the layers below, the command line and ``maskkit bench`` use ``maskkit.engine.run`` only
through its entry points, a built-in plugin imports only maskkit's plugin contracts and never
another plugin, and no test module imports another.

Every import counts, wherever it stands (module level, inside a function, under
``TYPE_CHECKING``): each is an arrow the reader follows. The checker is shown to catch an upward
arrow on a made-up module first.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import maskkit.engine.run

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "maskkit"
PLUGINS = REPO / "maskkit_plugins"
TESTS = REPO / "tests"
ARCHITECTURE = REPO / "docs" / "architecture.md"

#: The layers, lowest first: the parts of maskkit (a module, or a package with all its modules)
#: in each. docs/architecture.md shows the same table (checked below).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "maskkit",
            "errors",
            "config_keys",
            "config",
            "weighting",
            "consoles",
            "torchrun_env",
            "progress",
            "runtime",
            "rundir",
            "cache",
            "checkpoint",
            "distributed",
            "tensorboard_log",
        ),
    ),
    ("building blocks", ("data", "models", "report", "loggers", "export")),
    ("plugin contracts", ("policy", "masking", "hookspecs", "priors")),
    ("plugin manager", ("plugins",)),
    ("engine", ("engine",)),
    ("bench", ("bench", "cost")),
    ("command line", ("cli", "launch", "__main__")),
)
#: The highest layer a built-in plugin (``maskkit_plugins``) may import from.
PLUGIN_CEILING = "plugin contracts"
#: Upward arrows that are known and kept, (importer, imported) → why; docs/architecture.md
#: names each. Adding one needs a reason as good.
KNOWN_UPWARD: dict[tuple[str, str], str] = {
    ("maskkit.config", "maskkit.engine.hypergradient"): (
        "the config's estimator names come from the engine's one registry of estimators, read "
        "lazily (when a config is validated, not when config.py imports), so that the CLI starts "
        "without torch"
    ),
}


def _part(module: str) -> str:
    """``maskkit.engine.run`` → ``engine``; ``maskkit`` → ``maskkit`` (the package's own
    ``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of a maskkit module; KeyError for one no layer names."""
    part = _part(module)
    for index, (_, parts) in enumerate(LAYERS):
        if part in parts:
            return index
    raise KeyError(f"{module}: no layer of tests/test_layering.py's LAYERS names '{part}'")


def module_name(path: Path, root: Path) -> str:
    """The dotted name of the module at ``path`` under the import root ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(source: str, module: str, is_package: bool, root: Path) -> Iterator[tuple[str, list[str], int]]:
    """Every import in ``source`` as ``(imported module, names taken from it, line)``: a relative
    import resolved against ``module``, and ``from a import b`` as module ``a.b`` when ``b`` is a
    module under ``root``."""
    package = module if is_package else module.rpartition(".")[0]
    nodes = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import | ast.ImportFrom)]
    for node in sorted(nodes, key=lambda node: node.lineno):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [alias.name for alias in node.names]
            submodules = [name for name in names if _is_module(f"{base}.{name}", root)]
            for name in submodules:
                yield f"{base}.{name}", [], node.lineno
            rest = [name for name in names if name not in submodules]
            if rest or not submodules:
                yield base, rest, node.lineno


def upward_imports(source: str, module: str, is_package: bool = False, root: Path = REPO) -> list[str]:
    """The imports of ``source`` (maskkit module ``module``) from a higher layer, as messages."""
    found = []
    own = layer_of(module)
    for imported, _, line in imports(source, module, is_package, root):
        known = (module, imported) in KNOWN_UPWARD
        if imported.split(".")[0] == "maskkit" and layer_of(imported) > own and not known:
            found.append(
                f"{module}:{line} imports {imported} ({LAYERS[layer_of(imported)][0]}) from the "
                f"{LAYERS[own][0]} layer"
            )
    return found


def _modules(folder: Path, root: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(folder.rglob("*.py")):
        yield path, module_name(path, root)


def test_the_checker_catches_an_upward_import() -> None:
    # The data layer reaching up into the engine, three ways: each must be caught.
    source = (
        "from maskkit.engine.run import train\n"
        "def f():\n    from maskkit import cli\n"
        "import maskkit.bench.report\n"
        "from maskkit.errors import ConfigError\n"  # downward: fine
    )
    found = upward_imports(source, "maskkit.data.types")
    assert [message.split(" imports ")[1].split(" ")[0] for message in found] == [
        "maskkit.engine.run",
        "maskkit.cli",
        "maskkit.bench.report",
    ]
    assert upward_imports("from ..engine import run\n", "maskkit.data.types") == [
        "maskkit.data.types:1 imports maskkit.engine.run (engine) from the building blocks layer"
    ]


def test_every_module_of_maskkit_has_a_layer() -> None:
    unplaced = []
    for _, module in _modules(PACKAGE, REPO):
        try:
            layer_of(module)
        except KeyError as error:
            unplaced.append(str(error))
    assert not unplaced, unplaced


def test_no_module_imports_from_a_higher_layer() -> None:
    found = []
    for path, module in _modules(PACKAGE, REPO):
        found += upward_imports(path.read_text(), module, path.name == "__init__.py")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("part", ["bench", "cost", "cli"])
def test_the_cli_and_bench_use_the_run_module_only_through_its_entry_points(part: str) -> None:
    allowed = set(maskkit.engine.run.__all__)
    found = []
    for path, module in _modules(PACKAGE, REPO):
        if _part(module) != part:
            continue
        for imported, names, line in imports(path.read_text(), module, path.name == "__init__.py", REPO):
            if imported == "maskkit.engine.run":
                found += [f"{module}:{line} imports {name}" for name in names if name not in allowed]
    assert not found, found


def test_built_in_plugins_import_only_the_plugin_contracts_and_no_other_plugin() -> None:
    ceiling = [name for name, _ in LAYERS].index(PLUGIN_CEILING)
    found = []
    for path, module in _modules(PLUGINS, REPO):
        for imported, _, line in imports(
            path.read_text(), module, path.name == "__init__.py", PLUGINS.parent
        ):
            if imported.split(".")[0] == "maskkit_plugins":
                found.append(f"{module}:{line} imports the plugin module {imported}")
            elif imported.split(".")[0] == "maskkit" and layer_of(imported) > ceiling:
                found.append(f"{module}:{line} imports {imported}, above the plugin contracts")
    assert not found, found


def test_no_test_module_imports_another() -> None:
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for imported, _, line in imports(path.read_text(), path.stem, False, TESTS):
            if imported.split(".")[0].startswith("test_"):
                found.append(f"{path.name}:{line} imports {imported}: move what it shares to a helper module")
    assert not found, found


def test_the_architecture_page_shows_these_layers() -> None:
    rows = re.findall(r"^\| (\d) ([a-z ]+) \| (.+?) \|", ARCHITECTURE.read_text(), flags=re.MULTILINE)
    shown = {int(number): (name, set(re.findall(r"`([a-z_]+)`", parts))) for number, name, parts in rows}
    expected = {index + 1: (name, set(parts)) for index, (name, parts) in enumerate(LAYERS)}
    assert shown == expected
