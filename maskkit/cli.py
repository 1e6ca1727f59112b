"""The ``maskkit`` command line: policies, priors, train, evaluate, visualize, bench, cost, config."""

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

# Nothing imported here may import torch: `maskkit --help` answers at once (tests/test_cli_startup.py).
# Commands import what needs torch when they run.
from maskkit.config import DEFAULT_PRESET, PRESETS, batch_sizes, build_config, config_to_yaml, parse_override
from maskkit.consoles import user_console
from maskkit.errors import ConfigError, MaskkitError
from maskkit.launch import LaunchFailed, report_worker_failure, run_with_torchrun, worker_arguments
from maskkit.torchrun_env import DEFAULT_TIMEOUT_S, CollectiveFailure, launched_by_torchrun

app = typer.Typer(
    name="maskkit",
    help="Masking strategies for masked-autoencoder pretraining (MLO-MAE and friends).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")
priors_app = typer.Typer(help="Prior providers and the priors store.", no_args_is_help=True)
app.add_typer(priors_app, name="priors")

console = user_console()  # no source links in console.log; no wrapping in a pipe
error_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    """``--version``: the installed package's version (``importlib.metadata``), then exit."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("maskkit")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from maskkit import __version__ as installed
    typer.echo(f"maskkit {installed}")
    raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Options of ``maskkit`` itself (``--version``); each command has its own."""


# Width for tables printed to a pipe: wide enough that no row ever wraps.
UNWRAPPED_WIDTH = 10_000


@app.command()
def policies(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (policies and load failures) for scripts.")
    ] = False,
) -> None:
    """List installed masking policies: name, distribution, learnable, needs, description.

    learnable: "yes" (level 3 of the MLO loop trains it), "pretrain level" (its own loss trains
    it with the MAE, e.g. hpm's loss predictor) or "no" (fixed).
    """
    from maskkit.plugins import get_registry, registry_as_dict

    registry = get_registry()
    if as_json:
        typer.echo(json.dumps(registry_as_dict(registry), indent=2, ensure_ascii=False))
        return
    table = Table(title="Installed masking policies")
    _name_column(table, registry.policies)
    for column in ("distribution", "learnable", "needs", "description"):
        table.add_column(column)
    for info in sorted(registry.policies.values(), key=lambda item: item.name):
        table.add_row(
            info.name,
            info.distribution,
            info.trained_by,
            ", ".join(sorted(info.requires)) or "-",
            info.description,
        )
    _table_console().print(table)
    from maskkit.bench.suite import NONE_POLICY_NOTE

    _table_console().print(escape(NONE_POLICY_NOTE), highlight=False)
    _print_failures(registry.failures)


def _table_console() -> Console:
    """The console for a table: in a pipe or a log file, rows stay whole instead of wrapping at
    80 columns."""
    return console if console.is_terminal else Console(width=UNWRAPPED_WIDTH)


def _name_column(table: Table, names: dict) -> None:
    """A ``name`` column wide enough that no name is ever cut (they are what the user types)."""
    table.add_column("name", no_wrap=True, min_width=max((len(name) for name in names), default=4))


def _print_failures(failures: list) -> None:
    for failure in failures:
        error_console.print(
            "[yellow]warning:[/]", escape(failure.one_line()), soft_wrap=True, highlight=False
        )


#: ``priors list`` fits its table in this many columns at most (its cells wrap, one option a line).
PRIORS_TABLE_WIDTH = 110


@priors_app.command("list")
def priors_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (providers, their option defaults, load failures).")
    ] = False,
) -> None:
    """List installed prior providers: name, distribution, maps, options, description."""
    from maskkit.plugins import get_registry, providers_as_dict
    from maskkit.priors.store import default_store_dir

    registry = get_registry()
    if as_json:
        listing = {**providers_as_dict(registry), "store": str(default_store_dir())}
        typer.echo(json.dumps(listing, indent=2, ensure_ascii=False, default=repr))
        return
    table = Table(title="Installed prior providers", title_justify="left")
    _name_column(table, registry.providers)
    table.add_column("distribution")  # these three stay whole unless the window is narrow
    table.add_column("maps")
    table.add_column("options (default)", overflow="fold")
    table.add_column("description", ratio=1, min_width=12)
    for info in sorted(registry.providers.values(), key=lambda item: item.name):
        options = "\n".join(f"{name}={value!r}" for name, value in info.option_defaults.items())
        table.add_row(
            info.name, info.distribution, ", ".join(sorted(info.provides)), options or "-", info.description
        )
    width = min(console.width, PRIORS_TABLE_WIDTH) if console.is_terminal else PRIORS_TABLE_WIDTH
    Console(width=width).print(table)
    console.print(f"priors store: {default_store_dir()} (--priors-dir or $MASKKIT_PRIORS_DIR to change)")
    _print_failures(registry.failures)


def _option_pairs(assignments: list[str]) -> dict:
    """``["key=value", …]`` → ``{key: value}`` with values parsed as YAML (as --set does)."""
    options: dict = {}
    for assignment in assignments:
        if "=" not in assignment:
            raise ConfigError(f"--option expects KEY=VALUE, got '{assignment}'")
        key, raw = assignment.split("=", 1)
        options[key.strip()] = parse_override(f"value={raw}")["value"]
    return options


@priors_app.command("build")
def priors_build(
    provider: Annotated[str, typer.Option(help="Prior provider (see `maskkit priors list`).")],
    dataset: Annotated[str, typer.Option(help="The dataset, as `maskkit train --dataset` takes it.")],
    data_dir: Annotated[
        Path | None, typer.Option(help="Data folder (default: $MASKKIT_DATA_DIR, else a user cache folder).")
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(help="Side the images are resized to (default: the default preset's model.img_size)."),
    ] = None,
    subset: Annotated[int | None, typer.Option(help="Only the first N images of each split.")] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", help="A provider option: --option method=fine_grained")
    ] = None,
    priors_dir: Annotated[
        Path | None,
        typer.Option(help="The priors store (default: $MASKKIT_PRIORS_DIR, else a user cache folder)."),
    ] = None,
    download: Annotated[
        bool, typer.Option("--download/--no-download", help="Download missing data.")
    ] = False,
) -> None:
    """Compute a dataset's priors once per split and keep them in the priors store."""
    from maskkit.data import limit_dataset, load_dataset
    from maskkit.data.locations import default_data_dir
    from maskkit.engine.priors import PriorSpec, attach_priors, store_paths
    from maskkit.plugins import provider_info

    provider_info(provider)  # an unknown name fails before the data is read
    options = _option_pairs(option or [])
    size = image_size if image_size is not None else build_config(DEFAULT_PRESET).model.img_size
    if size < 1 or (subset is not None and subset < 1):
        raise ConfigError("--image-size and --subset must be positive")
    spec = PriorSpec(provider, options, dataset, data_dir, size, subset, priors_dir, build=True)
    loaded = load_dataset(dataset, data_dir or default_data_dir(), image_size=size, download=download)
    if subset is not None:
        loaded = limit_dataset(loaded, subset)
    paths = store_paths(loaded, spec)
    already = [name for name, path in paths.items() if path.is_file()]
    attach_priors(loaded, spec, console)
    for name in already:
        console.print(
            f"{provider} priors of {loaded.name} {name}: already built → {paths[name]}", highlight=False
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
        list[str] | None, typer.Option("--set", help="Override any config key: --set pretrain.mask.lr=1.0e-4")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue an interrupted run from its last checkpoint.")
    ] = None,
    prior: Annotated[
        str | None,
        typer.Option(help="Prior provider of a policy that reads priors (see `maskkit priors list`)."),
    ] = None,
    build_priors: Annotated[
        bool | None,
        typer.Option("--build-priors", help="Build missing priors in the store instead of stopping."),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train data-parallel in this many processes on this machine (one per GPU; runs "
            "torchrun --standalone). Several machines: start torchrun yourself (docs/distributed.md).",
        ),
    ] = None,
    collective_timeout: Annotated[
        float,
        typer.Option(
            min=1,
            help="Seconds a process of a multi-process run waits for the others before the run stops.",
        ),
    ] = DEFAULT_TIMEOUT_S,
    logger: Annotated[
        list[str] | None,
        typer.Option(
            "--logger",
            help="Where metrics go besides metrics.jsonl: csv, tensorboard, wandb, mlflow (comma-separated "
            "or repeated; config key `loggers`; all but csv need their extra, docs/install.md).",
        ),
    ] = None,
) -> None:
    """Pretrain (MLO when the policy is learnable), fine-tune and evaluate."""
    from maskkit.distributed import stop
    from maskkit.engine import run as runs

    overrides = _overrides(policy, dataset, data_dir, mask_ratio, seed, device, download, assignments or [])
    if prior is not None:
        overrides.append({"prior": prior})
    if build_priors:
        overrides.append({"data": {"build_priors": True}})
    if logger:  # --logger csv,wandb --logger mlflow
        names = [name.strip() for item in logger for name in item.split(",")]
        overrides.append({"loggers": [name for name in names if name]})
    if resume is not None and (config_file is not None or preset != DEFAULT_PRESET or run_dir is not None):
        raise ConfigError(
            "--resume continues a run with its saved config: drop --config, --preset and --run-dir"
        )
    if nproc is not None and nproc > 1:
        if launched_by_torchrun():
            raise ConfigError(
                "--nproc starts torchrun itself; under torchrun, set the number of processes with "
                "its --nproc_per_node and drop --nproc"
            )
        if resume is None:  # a bad config fails here, before any process starts
            from maskkit.distributed import check_batch_sizes
            from maskkit.plugins import policy_info
            from maskkit.policy import MASK_LEVEL

            config = build_config(preset, config_file, overrides)
            multilevel = MASK_LEVEL in policy_info(config.policy).policy_class.training_levels()
            check_batch_sizes(batch_sizes(config, multilevel), processes=nproc)
        run_with_torchrun(nproc, worker_arguments(sys.argv[1:]))
        return
    if resume is not None:
        runs.resume(resume, overrides, console, collective_timeout)
    else:
        config = build_config(preset, config_file, overrides)
        runs.train(config, run_dir, console, collective_timeout_s=collective_timeout)
    stop()  # leave the process group of a multi-process run


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
    """PNG grid: original → masked → reconstructed (→ the policy's per-patch maps: a learned
    mask probability, hpm's predicted loss scaled per image)."""
    from maskkit.engine.inspect_run import visualize_run

    visualize_run(run_dir, num_images, output, seed, console)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory whose pretraining has ended.")],
    format: Annotated[
        str, typer.Option("--format", help="timm (timm.create_model) or hf (transformers' ViTModel).")
    ] = "timm",
    out: Annotated[
        Path | None, typer.Option(help="Output folder, new or empty (default: RUN_DIR/export/<format>).")
    ] = None,
    checkpoint: Annotated[
        str,
        typer.Option(help="pretrained (the end of pretraining) or final (the fine-tuned encoder, no head)."),
    ] = "pretrained",
) -> None:
    """Write the run's ViT encoder (weights in safetensors and a config) for timm or transformers."""
    from maskkit.export import export_run

    path = export_run(run_dir, format, out, checkpoint)
    loader = (
        f'timm.create_model("local-dir:{path}", pretrained=True)'
        if format == "timm"
        else f'transformers.ViTModel.from_pretrained("{path}", add_pooling_layer=False)'
    )
    console.print(f"exported the '{checkpoint}' encoder to {path}; load it with {loader}", highlight=False)


@app.command()
def trial(
    source: Annotated[
        str, typer.Option("--from", help="RUN_DIR[:POINTER]: the checkpoint to fork (default pointer: last).")
    ],
    policy: Annotated[str, typer.Option(help="Policy A, the one under test (see `maskkit policies`).")],
    against: Annotated[str, typer.Option(help="Policy B, the baseline.")] = "random",
    forks: Annotated[int, typer.Option(help="N: forks (pairs of arms); the interval is over them.")] = 8,
    steps: Annotated[int, typer.Option(help="K: pretrain steps per arm.")] = 40,
    probe_images: Annotated[int, typer.Option(help="Training images of the linear probe.")] = 2000,
    probe_c: Annotated[
        float | None, typer.Option(help="The probe's C (default: chosen once on the starting encoder).")
    ] = None,
    option: Annotated[list[str] | None, typer.Option("--option", help="A's policy option: k=v.")] = None,
    against_option: Annotated[
        list[str] | None, typer.Option("--against-option", help="B's policy option: k=v.")
    ] = None,
    policy_from: Annotated[
        str | None, typer.Option(help="RUN_DIR[:POINTER] holding A's trained policy state.")
    ] = None,
    against_from: Annotated[
        str | None, typer.Option(help="RUN_DIR[:POINTER] holding B's trained policy state.")
    ] = None,
    mask_ratio: Annotated[float | None, typer.Option(help="A's mask ratio (default: the run's).")] = None,
    against_mask_ratio: Annotated[
        float | None, typer.Option(help="B's mask ratio (default: the run's).")
    ] = None,
    mask_seed: Annotated[int, typer.Option(help="A's mask seed.")] = 0,
    against_mask_seed: Annotated[int | None, typer.Option(help="B's mask seed (default: A's).")] = None,
    inverse: Annotated[
        bool, typer.Option("--inverse", help="A masks with its policy's inverse, the logits negated (−z).")
    ] = False,
    against_inverse: Annotated[
        bool, typer.Option("--against-inverse", help="B masks with its policy's inverse (−z).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seeds the forks' batches and the probe's images.")] = 0,
    lr: Annotated[
        float | None, typer.Option(help="The arms' pretrain lr (default: the run's base lr).")
    ] = None,
    lr_schedule: Annotated[
        str, typer.Option(help="The arms' lr over their steps: decay (linearly to 0) or constant.")
    ] = "decay",
    prior: Annotated[str | None, typer.Option(help="Prior provider of a policy that reads priors.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N] (default: the run's).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the result as JSON here.")] = None,
) -> None:
    """Paired fork test: does policy A help pretraining more than B? (docs/trial.md)"""
    from maskkit.engine import trial as trials

    settings = trials.TrialSettings(
        source=trials.RunSource.parse(source),
        arm_a=trials.ArmSpec(
            policy, _option_pairs(option or []), mask_ratio, mask_seed,
            trials.RunSource.parse(policy_from) if policy_from else None, inverse,
        ),
        arm_b=trials.ArmSpec(
            against, _option_pairs(against_option or []), against_mask_ratio,
            mask_seed if against_mask_seed is None else against_mask_seed,
            trials.RunSource.parse(against_from) if against_from else None, against_inverse,
        ),
        forks=forks, steps=steps, probe_images=probe_images, probe_c=probe_c, seed=seed, lr=lr,
        lr_schedule=lr_schedule, prior=prior, device=device,
    )  # fmt: skip
    result = trials.run_trial(settings, console)
    trials.print_trial(result, _table_console())
    if json_path is not None:
        console.print(f"saved [cyan]{trials.write_trial(result, json_path)}[/]")


@app.command()
def bench(
    suite_file: Annotated[Path, typer.Argument(help="A suite file (benchmarks/*.yaml; docs/bench.md).")],
    out: Annotated[
        Path | None, typer.Option(help="Output dir (default: the suite's `output`, else runs/bench/<name>).")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Cells run side by side (default 1); on slurm and ray, the most cells in flight "
            "(default: all, the scheduler queues them).",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1, help="Torch threads per cell process (default: the CPUs / --workers; slurm, ray: 4)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="The data folder the suite's datasets are read under (its `data_dir`)."),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            "--only", help="Run only these cells: policy=mlo,random  dataset=...  seed=0 (repeatable)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the cells and their state; run nothing.")
    ] = False,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only", help="Rebuild cells.csv, results.md, results.png and forest.png; run nothing."
        ),
    ] = False,
    executor: Annotated[
        str,
        typer.Option(help="Where the cells run: local (processes here), slurm (a submitit job each), ray."),
    ] = "local",
    nproc: Annotated[
        int | None, typer.Option(min=1, help="Processes per cell under torchrun (maskkit train --nproc).")
    ] = None,
    gpus_per_cell: Annotated[
        int | None,
        typer.Option(
            min=0, help="slurm, ray: GPUs per cell (default: --nproc, else 1; ray: 0 without GPUs)."
        ),
    ] = None,
    slurm_partition: Annotated[str | None, typer.Option(help="slurm: the partition.")] = None,
    slurm_account: Annotated[str | None, typer.Option(help="slurm: the account charged.")] = None,
    slurm_time: Annotated[
        int | None, typer.Option(min=1, help="slurm: each cell's time limit, in minutes (default 240).")
    ] = None,
    slurm_option: Annotated[
        list[str] | None,
        typer.Option(
            help="slurm: another submitit Slurm parameter, KEY=VALUE (constraint=a100; repeatable)."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="ray: the cluster, HOST:PORT, ray://HOST:PORT or auto (default: Ray's own)."),
    ] = None,
) -> None:
    """Run a benchmark suite: policies × datasets × seeds under one budget, then its report.

    Finished cells are skipped and interrupted ones resume from their checkpoints, so running the
    same command again finishes only what is missing, on any executor. Exit status 1 when a cell
    failed or was stopped.
    """
    from maskkit.bench.executors.settings import ExecutorOptions
    from maskkit.bench.main import BenchOptions, run_bench

    executor_options = ExecutorOptions(
        executor, nproc, gpus_per_cell, slurm_partition, slurm_account, slurm_time,
        tuple(slurm_option or ()), ray_address,
    )  # fmt: skip
    options = BenchOptions(
        suite_file, out, workers, threads, data_dir, tuple(only or ()), dry_run, report_only, executor_options
    )
    code = run_bench(options, console)
    if code:
        raise typer.Exit(code)


@app.command()
def cost(
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            help="A policy to measure beside random, the baseline (repeatable or comma-separated; "
            "default: mlo).",
        ),
    ] = None,
    preset: Annotated[str, typer.Option(help=f"One of {', '.join(PRESETS)}.")] = DEFAULT_PRESET,
    config_file: Annotated[
        Path | None, typer.Option("--config", help="YAML config merged over the preset.")
    ] = None,
    assignments: Annotated[
        list[str] | None, typer.Option("--set", help="Override any config key: --set model.depth=6")
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="Measure on this dataset, read as `maskkit train` reads it (default: synthetic images)."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data folder of --dataset (default: $MASKKIT_DATA_DIR, else a user cache folder)."),
    ] = None,
    download: Annotated[
        bool | None, typer.Option("--download/--no-download", help="With --dataset: download it if missing.")
    ] = None,
    prior: Annotated[
        str | None, typer.Option(help="With --dataset: prior provider of the policies that read priors.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda[:N].")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32 or bf16 (default: the config's).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads (default: torch's).")] = None,
    iterations: Annotated[
        int, typer.Option(help="Timed MLO iterations per policy (their median counts).")
    ] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed MLO iterations before them.")] = 1,
    flops: Annotated[bool, typer.Option(help="Count the FLOPs of one iteration.")] = True,
    breakdown: Annotated[
        bool, typer.Option(help="Profile one more iteration: its time and FLOPs by level and part.")
    ] = True,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write every number as JSON here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write the report as Markdown here.")] = None,
) -> None:
    """What a policy costs per pretrain step against random, and where an MLO iteration's time
    and FLOPs go, level by level (docs/benchmarks.md).

    Times N MLO iterations of each policy after W warm-ups, on the config `maskkit train` would
    build, in this process: random first, then the policies named. Exit status 1 when a policy
    ran out of memory.
    """
    import shlex

    from maskkit.cost.command import CostOptions, run_cost

    options = CostOptions(
        tuple(policy or ()), preset, config_file, tuple(assignments or ()), dataset, data_dir, download,
        prior, device, precision, threads, iterations, warmup, flops, breakdown, json_path, markdown,
        command="maskkit " + shlex.join(sys.argv[1:]),
    )  # fmt: skip
    code = run_cost(options, console, _table_console())
    if code:
        raise typer.Exit(code)


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

    Typer itself answers usage errors (exit 2) and Ctrl-C (exit 130). A process of a
    multi-process run (under torchrun) that fails for any reason also ends in one line, exit code
    1 (2 for a user error), and records it for torchrun, which stops the other processes. With
    ``MASKKIT_DEBUG=1`` the traceback of a user error is printed above its line (for plugin
    authors).
    """
    _show_warnings_in_one_line()
    try:
        app()
    except MaskkitError as error:
        if os.environ.get("MASKKIT_DEBUG", "") not in ("", "0"):
            traceback.print_exception(error)
        _fail(str(error), 2, every_process=False)
    except LaunchFailed as error:
        _print_error(str(error))
        sys.exit(error.exit_code)
    except Exception as error:
        if not launched_by_torchrun():
            raise
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = detail if isinstance(error, CollectiveFailure) else f"{type(error).__name__}: {detail}"
        _fail(message, 1, every_process=True, traceback_text=traceback.format_exc())


def _show_warnings_in_one_line() -> None:
    """maskkit's own warnings (:class:`~maskkit.errors.MaskkitWarning`) print as one
    ``warning:`` line; every other warning as Python prints it."""
    import warnings

    from maskkit.errors import MaskkitWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
        if issubclass(category, MaskkitWarning):
            error_console.print("[yellow]warning:[/]", escape(str(message)), highlight=False, soft_wrap=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _print_error(message: str) -> None:
    error_console.print("[bold red]error:[/]", escape(message), highlight=False, soft_wrap=True)


def _fail(message: str, exit_code: int, every_process: bool, traceback_text: str | None = None) -> None:
    """End with one ``error:`` line and ``exit_code``. Under torchrun the failure is recorded for
    it; a user error, which every process meets alike, is printed by rank 0 only, and anything
    else by the process it happened to, named."""
    if launched_by_torchrun():
        rank = os.environ.get("RANK", "0")
        print_here = report_worker_failure(message, traceback_text) and (every_process or rank == "0")
        if print_here:
            _print_error(f"process {rank}: {message}" if every_process else message)
    else:
        _print_error(message)
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
