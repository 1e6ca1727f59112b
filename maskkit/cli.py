"""The ``maskkit`` command line: policies, train, evaluate, visualize, config."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from maskkit.config import DEFAULT_PRESET, PRESETS, build_config, config_to_yaml, parse_override
from maskkit.errors import ConfigError, MaskkitError

app = typer.Typer(
    name="maskkit",
    help="Masking strategies for masked-autoencoder pretraining (MLO-MAE and friends).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
error_console = Console(stderr=True)
# Width for tables printed to a pipe: wide enough that no row ever wraps.
UNWRAPPED_WIDTH = 10_000


@app.command()
def policies(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (policies and load failures) for scripts.")
    ] = False,
) -> None:
    """List installed masking policies: name, distribution, learnable, needs, description."""
    from maskkit.plugins import get_registry, registry_as_dict

    registry = get_registry()
    if as_json:
        typer.echo(json.dumps(registry_as_dict(registry), indent=2, ensure_ascii=False))
        return
    table = Table(title="Installed masking policies")
    for column in ("name", "distribution", "learnable", "needs", "description"):
        table.add_column(column)
    for info in sorted(registry.policies.values(), key=lambda item: item.name):
        table.add_row(
            info.name,
            info.distribution,
            "yes" if info.learnable else "no",
            ", ".join(sorted(info.requires)) or "-",
            info.description,
        )
    # In a pipe or a log file, rows stay whole instead of wrapping at 80 columns.
    (console if console.is_terminal else Console(width=UNWRAPPED_WIDTH)).print(table)
    for failure in registry.failures:
        error_console.print(
            "[yellow]warning:[/]", escape(failure.one_line()), soft_wrap=True, highlight=False
        )


def _overrides(
    policy: str | None,
    dataset: str | None,
    data_dir: Path | None,
    mask_ratio: float | None,
    seed: int | None,
    device: str | None,
    download: bool | None,
    assignments: list[str],
) -> list[dict]:
    named: dict = {}
    if policy is not None:
        named["policy"] = policy
    if mask_ratio is not None:
        named["mask_ratio"] = mask_ratio
    if seed is not None:
        named["seed"] = seed
    if device is not None:
        named["device"] = device
    data: dict = {}
    if dataset is not None:
        data["dataset"] = dataset
    if data_dir is not None:
        data["data_dir"] = str(data_dir)
    if download is not None:
        data["download"] = download
    if data:
        named["data"] = data
    return [parse_override(item) for item in assignments] + [named]


@app.command()
def train(
    policy: Annotated[str | None, typer.Option(help="Masking policy (see `maskkit policies`).")] = None,
    dataset: Annotated[
        str | None, typer.Option(help="dermamnist, any 2-D MedMNIST flag, cifar10, cifar100, imagefolder.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data folder (default: $MASKKIT_DATA_DIR, else a user cache folder).")
    ] = None,
    preset: Annotated[str, typer.Option(help=f"One of {', '.join(PRESETS)}.")] = DEFAULT_PRESET,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML config merged over the preset.")
    ] = None,
    mask_ratio: Annotated[float | None, typer.Option(help="Fraction of patches masked.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N].")] = None,
    download: Annotated[
        bool | None, typer.Option("--download/--no-download", help="Download missing data.")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run directory (default: runs/<time>-<policy>-<dataset>).")
    ] = None,
    assignments: Annotated[
        list[str] | None, typer.Option("--set", help="Override any config key: --set pretrain.mask.lr=1e-4")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run from its last checkpoint.")
    ] = None,
) -> None:
    """Pretrain (MLO when the policy is learnable), fine-tune and evaluate."""
    from maskkit.engine import run as runs

    overrides = _overrides(policy, dataset, data_dir, mask_ratio, seed, device, download, assignments or [])
    if resume is not None:
        if config_file is not None or preset != DEFAULT_PRESET or run_dir is not None:
            raise ConfigError(
                "--resume continues a run with its saved config: drop --config, --preset and --run-dir"
            )
        runs.resume(resume, overrides, console)
        return
    runs.train(build_config(preset, config_file, overrides), run_dir, console)


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    split: Annotated[str, typer.Option(help="test or val.")] = "test",
) -> None:
    """Metrics of a finished run, printed as a table and saved as JSON (+ confusion matrix PNG)."""
    from maskkit.engine.inspect_run import evaluate_run

    evaluate_run(run_dir, split, console)


@app.command()
def visualize(
    run_dir: Annotated[Path, typer.Argument(help="A run directory with a pretrained checkpoint.")],
    num_images: Annotated[int, typer.Option(min=1, max=64, help="Test images to show.")] = 8,
    output: Annotated[
        Path | None, typer.Option(help="PNG path (default: RUN_DIR/plots/masks_*.png).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Which images, and the random masks' draw.")] = 0,
) -> None:
    """PNG grid: original → masked → reconstructed (→ learned mask probability)."""
    from maskkit.engine.inspect_run import visualize_run

    visualize_run(run_dir, num_images, output, seed, console)


@config_app.command("show")
def config_show(
    preset: Annotated[str, typer.Option(help=f"One of {', '.join(PRESETS)}.")] = DEFAULT_PRESET,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML config merged over the preset.")
    ] = None,
    assignments: Annotated[list[str] | None, typer.Option("--set", help="KEY.PATH=VALUE overrides.")] = None,
) -> None:
    """Print the resolved configuration as YAML."""
    overrides = [parse_override(item) for item in assignments or []]
    console.print(config_to_yaml(build_config(preset, config_file, overrides)), end="", highlight=False)


def main() -> None:
    """Entry point: user errors end in one line on stderr and exit code 2.

    Typer itself answers usage errors (exit 2) and Ctrl-C (exit 130). With ``MASKKIT_DEBUG=1``
    the traceback of a user error is printed above its line (for plugin authors).
    """
    try:
        app()
    except MaskkitError as error:
        if os.environ.get("MASKKIT_DEBUG", "") not in ("", "0"):
            traceback.print_exception(error)
        error_console.print("[bold red]error:[/]", escape(str(error)), highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
