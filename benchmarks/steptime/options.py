"""The command line: every option of ``benchmarks/step_time.py`` and their resolution against a
named workload."""

from __future__ import annotations

import argparse
from pathlib import Path

from maskkit.config import PRESETS

from .variants import expand_variants, parse_settings, split_list
from .workloads import WORKLOADS

DEFAULT_POLICIES = "random,mlo,mlo-light,blockwise,hpm"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time one MLO iteration (stage 1) per masking policy on synthetic data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Workloads: "
        + "; ".join(f"{name}: {workload.description}" for name, workload in WORKLOADS.items()),
    )
    parser.add_argument(
        "--preset",
        default="cpu",
        choices=(*PRESETS, *WORKLOADS),
        help="a maskkit config preset, or a named benchmark workload (see below)",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML file merged over the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="config override, e.g. pretrain.hypergradient.estimator=cg or model.embed_dim=768 (repeatable)",
    )
    parser.add_argument(
        "--policies",
        default=None,
        help=f"comma-separated policy names (default: {DEFAULT_POLICIES}, or the workload's)",
    )
    parser.add_argument("--iterations", type=int, default=5, help="timed MLO iterations per policy")
    parser.add_argument("--warmup", type=int, default=1, help="untimed MLO iterations before timing")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batch size of all three levels (default: the preset's)"
    )
    compare = parser.add_argument_group("compared MLO settings (every combination is run)")
    compare.add_argument(
        "--unroll",
        default=None,
        metavar="P/F/M[,P/F/M...]",
        help="unroll steps of the pretrain/finetune/mask levels, e.g. 1/1/1,2/1/1 (default: the preset's)",
    )
    compare.add_argument(
        "--darts-mode",
        default=None,
        metavar="MODE[,MODE]",
        help="pretrain.hypergradient.darts_mode: exact, finite-difference, or both (default: the config's)",
    )
    compare.add_argument(
        "--mask-every",
        default=None,
        metavar="K[,K...]",
        help="update the mask level every K finetune steps (sets pretrain.head.unroll_steps; "
        "applied after --unroll), e.g. 1,2,4",
    )
    compare.add_argument(
        "--setting",
        dest="settings",
        action="append",
        nargs="+",
        default=None,
        metavar="NAME KEY=VALUE",
        help="a named set of config values, compared with the other named settings (repeatable), "
        "e.g. --setting eager compile=false --setting compiled compile=true",
    )
    compare.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run each policy's settings in one process, one iteration of each in turn (rotating "
        "the order), so that all see the same machine load; each setting keeps its own random "
        "stream, and its first iteration (compilation included) is reported apart",
    )
    parser.add_argument(
        "--learned-mask-costs",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also time the learned-mask work of a learnable policy per call (its mask decision, "
        "the head refit, the mask-health diagnostics and the SNR probe) and amortise it over a run "
        "of the preset's epochs on --num-images images",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense peak in TFLOP/s for the MFU columns (default: the datasheet's "
        "bf16 peak of a known GPU; none on the CPU)",
    )
    parser.add_argument(
        "--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's, auto)"
    )
    parser.add_argument(
        "--precision", default=None, choices=("auto", "fp32", "bf16"), help="default: the preset's (auto)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's, or the workload's)"
    )
    parser.add_argument(
        "--cpu-tuning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the CPU, apply maskkit.runtime.tune_cpu_runtime (glibc malloc thresholds, subnormals "
        "flushed) as `maskkit train` does; --no-cpu-tuning shows its effect",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="benchmark on this dataset (a maskkit dataset name, read from --data-dir) instead of "
        "synthetic images, e.g. for the learned-mask costs on real labels",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="where --dataset is (default: maskkit's)")
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="synthetic training images (default: max(256, 2 × the largest batch))",
    )
    parser.add_argument(
        "--policy-subprocess",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="benchmark each policy in a fresh Python process (clean peak-memory numbers)",
    )
    parser.add_argument(
        "--flops", action=argparse.BooleanOptionalAction, default=True, help="count FLOPs of one iteration"
    )
    parser.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="profile one more iteration and break its time and FLOPs down by level and part",
    )
    parser.add_argument(
        "--peak-seconds",
        type=float,
        default=1.0,
        help="seconds spent measuring the dense matmul rate (0 to skip)",
    )
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print issue 8's quoted reference figures beside this run's, and its goal",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    parser.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="also print Markdown tables (or write them to PATH)",
    )
    # Internal: run one policy (in one variant) and write its result (used by --policy-subprocess).
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-variant", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed options, with a workload's defaults filled in and these added:
    ``config_preset`` (the maskkit preset), ``workload`` (the named workload or None),
    ``workload_config`` (its config layers), ``policy_list`` and ``variants``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    args.workload = WORKLOADS.get(args.preset)
    args.config_preset = args.workload.base_preset if args.workload else args.preset
    args.workload_config = [args.workload.config] if args.workload else []
    if args.workload is not None:
        for option, value in args.workload.options.items():
            if getattr(args, option) is None:
                setattr(args, option, value)
    args.policy_list = split_list(args.policies or DEFAULT_POLICIES)
    if not args.policy_list:
        parser.error("--policies names no policy")
    try:
        settings = parse_settings(args.settings)
        args.variants = expand_variants(args.unroll, args.darts_mode, args.mask_every, settings)
    except ValueError as error:
        parser.error(str(error))
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be above 0")
    if args.dataset is not None and args.data_dir is None:
        from maskkit.data import default_data_dir

        args.data_dir = default_data_dir()
    if not 0 <= args.worker_variant < len(args.variants):
        parser.error("--worker-variant is out of range")
    return args
