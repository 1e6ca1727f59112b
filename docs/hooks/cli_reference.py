"""mkdocs hook: the CLI reference page, rendered from the Typer app at every build.

typer's own Markdown renderer (the one behind ``typer maskkit.cli utils docs``) walks the click
command tree that ``typer.main.get_command`` builds from ``maskkit.cli.app``, so the page shows
exactly the commands, arguments, options, defaults and help texts the code defines. Nothing is
written into ``docs/``: the page is added to the build as a generated file.
"""

from __future__ import annotations

import typer
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from typer.cli import get_docs_for_click

CLI_PAGE = "reference/cli.md"
INTRO = """\
This page is generated from the command line's own definitions (`maskkit.cli`) each time the
site is built. `maskkit COMMAND --help` prints the same in a terminal. User errors end in one
`error:` line and exit code 2; `MASKKIT_DEBUG=1` prints the traceback as well.

"""


def cli_reference_markdown() -> str:
    """The Markdown of the CLI reference: every command of ``maskkit``, as Typer defines it."""
    from maskkit.cli import app

    command = typer.main.get_command(app)
    context = typer.Context(command, info_name="maskkit")
    body = get_docs_for_click(obj=command, ctx=context, name="maskkit", title="CLI reference")
    title, rest = body.split("\n", 1)
    return f"{title}\n\n{INTRO}{rest.strip()}\n"


def on_files(files: Files, config: MkDocsConfig) -> Files:
    files.append(File.generated(config, CLI_PAGE, content=cli_reference_markdown()))
    return files
