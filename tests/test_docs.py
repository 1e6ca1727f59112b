"""The documentation site builds without a warning, and its generated and quoted parts stay true."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from maskkit.cli import app
from maskkit.plugins import get_registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FIGURE_LIMIT_BYTES = 200_000


def _cli_reference_hook():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_builds_in_strict_mode_with_no_warning(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    site = tmp_path / "site"
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    assert "maskkit train" in cli_page and "--resume" in cli_page
    # Defaults written with <placeholders> reach the page as text, not as HTML tags that vanish.
    assert "runs/--" not in cli_page and "runs/bench/<" not in cli_page
    assert "runs/&lt;time&gt;-&lt;policy&gt;-&lt;dataset&gt;" in cli_page
    assert "runs/bench/&lt;name&gt;" in cli_page
    # The command lists are whole and the usage lines name arguments as --help does.
    visible = html.unescape(re.sub(r"<[^>]+>", "", cli_page))  # the text, out of its highlighting
    assert "…" not in cli_page and "{run_dir}" not in visible
    assert "$ maskkit evaluate [OPTIONS] RUN_DIR" in visible and "runs/<time>-<policy>-<dataset>" in visible
    assert "decision_from_scores" in (site / "reference" / "api" / "policy" / "index.html").read_text()
    assert "PriorProvider" in (site / "reference" / "api" / "priors" / "index.html").read_text()
    assert "average_gradients_" in (site / "reference" / "api" / "distributed" / "index.html").read_text()
    assert "DeviceBatches" in (site / "reference" / "api" / "data" / "index.html").read_text()
    for page in ("guidance", "distributed", "mlo", "priors"):
        assert (site / page / "index.html").is_file(), page
    assert not (site / "hooks").exists()  # the build's own code is not published


def _commands(command, path: tuple[str, ...] = ()):
    """Every (path, click command) under ``command``, groups included."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_the_cli_reference_shows_every_command_and_option() -> None:
    markdown = _cli_reference_hook().cli_reference_markdown()
    assert markdown.startswith("# CLI reference\n")
    root = typer.main.get_command(app)
    commands = list(_commands(root))
    assert {"train", "policies", "evaluate", "visualize", "config show"} <= {" ".join(p) for p, _ in commands}
    for path, command in commands:
        if path:
            assert f"## `maskkit {' '.join(path)}`" in markdown, path
        for parameter in command.params:
            for option in parameter.opts:
                if option.startswith("-"):
                    assert f"`{option}" in markdown, (path, option)
    assert "--json" in markdown  # `maskkit policies --json`
    assert {"priors list", "priors build"} <= {" ".join(p) for p, _ in commands}
    for option in ("`--nproc", "`--prior", "`--build-priors", "`--collective-timeout", "`--option"):
        assert option in markdown, option


def test_the_cli_reference_escapes_placeholders_and_lists_commands_whole() -> None:
    markdown = _cli_reference_hook().cli_reference_markdown()
    assert "runs/&lt;time&gt;-&lt;policy&gt;-&lt;dataset&gt;" in markdown
    assert "<time>" not in markdown.replace("`--run-dir <path>`", "")
    assert "`maskkit policies`" in markdown  # code spans are left as they are
    root = typer.main.get_command(app)
    context = typer.Context(root, info_name="maskkit")
    for name in root.list_commands(context):
        first_sentence = root.get_command(context, name).help.split("\n\n")[0].replace("\n", " ").strip()
        assert f"* `{name}`: {first_sentence.replace('<', '&lt;').replace('>', '&gt;')}" in markdown, name
    assert "{run_dir}" not in markdown and "$ maskkit bench [OPTIONS] SUITE_FILE" in markdown
    assert "--set pretrain.mask.lr=1.0e-4" in markdown  # YAML reads 1e-4 as a string


# A figure still to be made leaves this comment where it goes (a link to a missing file would
# fail the strict build); the figure then replaces it.
FIGURE_PLACEHOLDER = "<!-- FIGURE: masks-{name}.png -->"


def _built_ins(kind: str) -> list[str]:
    entries = getattr(get_registry(), kind)
    return sorted(name for name, info in entries.items() if info.distribution == "maskkit")


def _policy_page(name: str, built_ins: list[str]) -> str:
    """A policy's page: its own, or for a ``-fixed`` sibling the page of its learnable sibling."""
    sibling = name.removesuffix("-fixed")
    return sibling if name.endswith("-fixed") and sibling in built_ins else name


def test_every_built_in_policy_has_a_page_with_its_figure_in_the_navigation() -> None:
    navigation = (ROOT / "mkdocs.yml").read_text()
    overview = (DOCS / "policies" / "index.md").read_text()
    built_ins = _built_ins("policies")
    assert {"random", "mlo", "blockwise", "hpm", "semantic-soft-fixed"} <= set(built_ins)
    for name in built_ins:
        page_name = _policy_page(name, built_ins)
        page = DOCS / "policies" / f"{page_name}.md"
        assert page.is_file(), f"{name} has no page: add docs/policies/{name}.md"
        assert f"policies/{page_name}.md" in navigation, (
            f"docs/policies/{page_name}.md is not in mkdocs.yml's nav"
        )
        text = page.read_text()
        if page_name != name:  # a -fixed sibling: a section of its own on the shared page
            assert f"\n## `{name}`\n" in text, f"docs/policies/{page_name}.md has no section for {name}"
        figures = [f"{name}.png", f"masks-{name}.png"]  # the existing ones, the placeholder's
        if FIGURE_PLACEHOLDER.format(name=name) in text:
            made = [figure for figure in figures if (DOCS / "policies" / "figures" / figure).exists()]
            assert not made, f"{made} exists: link it from {page.name} in place of the comment"
        else:
            linked = [figure for figure in figures if f"(figures/{figure})" in text]
            assert linked, f"{page.name} shows no figure of {name} (nor the placeholder comment)"
            figure = DOCS / "policies" / "figures" / linked[0]
            assert figure.is_file() and figure.stat().st_size < FIGURE_LIMIT_BYTES, figure
        assert f"[`{name}`]({page_name}.md" in overview, f"policies/index.md does not list {name}"


def test_every_built_in_prior_provider_has_a_page_in_the_navigation() -> None:
    navigation = (ROOT / "mkdocs.yml").read_text()
    overview = (DOCS / "priors" / "index.md").read_text()
    built_ins = _built_ins("providers")
    assert {"otsu", "saliency", "sam", "center"} <= set(built_ins)
    for name in built_ins:
        assert (DOCS / "priors" / f"{name}.md").is_file(), f"{name} has no page: add docs/priors/{name}.md"
        assert f"priors/{name}.md" in navigation, f"docs/priors/{name}.md is not in mkdocs.yml's nav"
        assert f"[`{name}`]({name}.md)" in overview, f"priors/index.md does not list {name}"


TITLED_BLOCK = re.compile(r'^```\w+ title="(?P<path>[^"]+)"\n(?P<body>.*?)^```$', re.S | re.M)


def test_code_quoted_from_a_file_is_an_exact_excerpt_of_it() -> None:
    quoted = 0
    for page in DOCS.rglob("*.md"):
        for block in TITLED_BLOCK.finditer(page.read_text()):
            source = (ROOT / block["path"]).read_text().splitlines()
            excerpt = block["body"].rstrip("\n").splitlines()
            starts = [i for i in range(len(source)) if source[i : i + len(excerpt)] == excerpt]
            assert starts, f"{page.name}: the block titled {block['path']} is not an excerpt of it"
            quoted += 1
    assert quoted >= 10  # the tutorial quotes both examples


SHELL_BLOCK = re.compile(r"^```(?:bash|text)\n(.*?)^```$", re.S | re.M)
MASKKIT_CALL = re.compile(r"(?:^|&& |\$ |bin/)maskkit ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", re.M)


@pytest.mark.parametrize("page", sorted(str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md")))
def test_commands_in_the_pages_exist(page: str) -> None:
    names = {" ".join(path) for path, _ in _commands(typer.main.get_command(app)) if path}
    for block in SHELL_BLOCK.findall((DOCS / page).read_text()):
        for command, sub in MASKKIT_CALL.findall(block):
            assert command in names, f"{page}: `maskkit {command}` is no command"
            if f"{command} {sub}" not in names and any(n.startswith(f"{command} ") for n in names):
                raise AssertionError(f"{page}: `maskkit {command} {sub}` is no command")


def test_mkdocs_config_is_the_one_ci_builds() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "python"))
    assert config["strict"] is True
    assert config["docs_dir"] == "docs"
    assert "docs/hooks/cli_reference.py" in config["hooks"]
