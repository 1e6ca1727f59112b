"""mkdocs hook: the CLI reference page, rendered from the Typer app at every build.

The page walks the click command tree that ``typer.main.get_command`` builds from
``maskkit.cli.app``, so it shows exactly the commands, arguments, options, defaults and help texts
the code defines. Each option's line is click's own help record (name, type, ``[default: …]``,
range); the hook adds what a Markdown page needs on top: help texts are HTML-escaped outside code
spans (a default like ``runs/<time>-<policy>`` would otherwise be read as HTML tags and vanish),
the command lists carry each command's whole first sentence rather than a cut-off one, and usage
lines name arguments in capitals (``RUN_DIR``) as ``--help`` does. Nothing is written into
``docs/``: the page is added to the build as a generated file.
"""

from __future__ import annotations

import html
import inspect
import re

import typer
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

CLI_PAGE = "reference/cli.md"
INTRO = """\
This page is generated from the command line's own definitions (`maskkit.cli`) each time the
site is built. `maskkit COMMAND --help` prints the same in a terminal. User errors end in one
`error:` line and exit code 2; `MASKKIT_DEBUG=1` prints the traceback as well.

"""
CODE_SPAN = re.compile(r"(`[^`]*`)")
# click's short help is cut at 45 characters with "..."; the reference shows the whole sentence.
SHORT_HELP_LIMIT = 10_000


def escape_markdown(text: str) -> str:
    """``text`` with ``<``, ``>`` and ``&`` escaped for HTML, except inside `code spans`."""
    pieces = CODE_SPAN.split(text)
    return "".join(piece if piece.startswith("`") else html.escape(piece, quote=False) for piece in pieces)


def _is_group(command) -> bool:
    return hasattr(command, "list_commands")


def _is_argument(parameter) -> bool:
    return parameter.param_type_name == "argument"


def usage_line(command, path: tuple[str, ...]) -> str:
    """``maskkit evaluate [OPTIONS] RUN_DIR``: the usage line, arguments named as ``--help`` names them."""
    pieces = list(path)
    if command.add_help_option or not all(_is_argument(p) for p in command.params):
        pieces.append("[OPTIONS]")
    for parameter in command.params:
        if _is_argument(parameter):
            name = (parameter.name or "").upper() + ("..." if parameter.nargs != 1 else "")
            pieces.append(name if parameter.required else f"[{name}]")
    if _is_group(command):
        pieces.append("COMMAND [ARGS]...")
    return " ".join(pieces)


def _help_records(command, context: typer.Context) -> tuple[list, list]:
    arguments, options = [], []
    for parameter in command.get_params(context):
        record = parameter.get_help_record(context)
        if record is None:
            continue
        if _is_argument(parameter):  # RUN_DIR, as the usage line names it
            arguments.append(((parameter.name or "").upper(), record[1]))
        else:
            options.append(record)
    return arguments, options


def _items(title: str, records: list[tuple[str, str]]) -> list[str]:
    if not records:
        return []
    lines = [f"**{title}**:", ""]
    for name, help_text in records:
        help_text = " ".join(help_text.split())
        lines.append(f"* `{name}`" + (f": {escape_markdown(help_text)}" if help_text else ""))
    return [*lines, ""]


def command_markdown(command, context: typer.Context, path: tuple[str, ...]) -> list[str]:
    """The Markdown lines of one command and, for a group, of each of its subcommands."""
    lines: list[str] = []
    if len(path) > 1:
        lines += [f"{'#' * len(path)} `{' '.join(path)}`", ""]
    if command.help:
        lines += [escape_markdown(inspect.cleandoc(command.help).split("\f", 1)[0].strip()), ""]
    lines += ["**Usage**:", "", "```console", f"$ {usage_line(command, path)}", "```", ""]
    arguments, options = _help_records(command, context)
    lines += _items("Arguments", arguments) + _items("Options", options)
    if _is_group(command):
        subcommands = [(name, command.get_command(context, name)) for name in command.list_commands(context)]
        lines += ["**Commands**:", ""]
        lines += [
            f"* `{name}`: {escape_markdown(sub.get_short_help_str(limit=SHORT_HELP_LIMIT))}"
            for name, sub in subcommands
        ]
        lines.append("")
        for name, sub in subcommands:
            sub_context = typer.Context(sub, info_name=name, parent=context)
            lines += command_markdown(sub, sub_context, (*path, name))
    return lines


def cli_reference_markdown() -> str:
    """The Markdown of the CLI reference: every command of ``maskkit``, as Typer defines it."""
    from maskkit.cli import app

    root = typer.main.get_command(app)
    context = typer.Context(root, info_name="maskkit")
    body = "\n".join(command_markdown(root, context, ("maskkit",))).strip()
    return f"# CLI reference\n\n{INTRO}{body}\n"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, CLI_PAGE, content=cli_reference_markdown()))
    return files
