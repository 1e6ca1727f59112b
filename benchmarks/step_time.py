"""Time one MLO iteration of stage 1 per masking policy, on synthetic data.

One *MLO iteration* is ``pretrain.unroll_steps × finetune.unroll_steps`` calls of
``Pretrainer.step`` (2 with the presets' 2/1/1 unroll). For a learnable policy (``mlo``,
``mlo-light``) it includes the finetune and mask steps and the mask level's hypergradient; for a
policy without level 3 (``random``, ``blockwise``, ``hpm``, whose loss predictor trains inside
the pretrain step) it is the same number of pretrain steps, so the ratio column is the cost
over random-mask MAE on the same model.

Reported per policy: median seconds per iteration and per pretrain step, the ratio to
``random``, images/s, FLOPs per iteration (``torch.utils.flop_counter``) and the achieved FLOP
rate (as a fraction of a measured dense-matmul rate), peak memory, parameter counts and the
loss evaluations per iteration by level and purpose.

    python benchmarks/step_time.py --preset cpu --policies random,mlo,mlo-light,blockwise,hpm \\
        --iterations 5 --warmup 1 --markdown --json step_time.json

Nothing is read from or written to the repository: the data are random uint8 images and the
run directory is a temporary one. See ``benchmarks/README.md`` for the columns.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from maskkit.config import PRESETS, RunConfig, build_config, parse_override
from maskkit.data import ImageSplit, LabelledDataset, make_splits
from maskkit.engine.context import RunContext
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models, policy_context
from maskkit.errors import MaskkitError
from maskkit.models import ClassifierHead, MaskedAutoencoderViT
from maskkit.plugins import create_policy, create_provider, policy_info
from maskkit.priors.attach import computed_priors
from maskkit.rundir import RunDir
from maskkit.runtime import select_device, use_bf16

NUM_CLASSES = 7
DEFAULT_POLICIES = "random,mlo,mlo-light,blockwise,hpm"
MODEL_OPTIONS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
)
#: Bytes per parameter that any training step keeps: fp32 weight, gradient, AdamW's two moments.
STATE_BYTES_PER_PARAMETER = 16
#: Extra fp32 copies of the pretrain level's weights during the hypergradient (the saved weights
#: of the finite difference, the gradients at ±ε, the vector pushed through the level, ...).
HYPERGRADIENT_COPIES = 5
ENVIRONMENT_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD", "PYTORCH_", "CUDA_VISIBLE")

stderr = Console(stderr=True, highlight=False)


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time one MLO iteration (stage 1) per masking policy on synthetic data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="cpu", choices=PRESETS, help="config preset")
    parser.add_argument("--config", type=Path, default=None, help="YAML file merged over the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="config override, e.g. pretrain.mask.hypergradient=cg (repeatable)",
    )
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help="comma-separated policy names")
    parser.add_argument("--iterations", type=int, default=5, help="timed MLO iterations per policy")
    parser.add_argument("--warmup", type=int, default=1, help="untimed MLO iterations before timing")
    for option in MODEL_OPTIONS:
        flag = "--" + option.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"model.{option} (default: the preset's)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batch size of all three levels (default: the preset's)"
    )
    parser.add_argument(
        "--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's, auto)"
    )
    parser.add_argument(
        "--precision", default=None, choices=("auto", "fp32", "bf16"), help="default: the preset's (auto)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
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
        "--peak-seconds",
        type=float,
        default=1.0,
        help="seconds spent measuring the dense matmul rate (0 to skip)",
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
    # Internal: run one policy and write its result (used by --policy-subprocess).
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    args.policy_list = [name.strip() for name in args.policies.split(",") if name.strip()]
    if not args.policy_list:
        parser.error("--policies names no policy")
    return args


def make_config(args: argparse.Namespace, policy: str, total_steps: int | None = None) -> RunConfig:
    """The preset with the command line's model, batch and device choices applied."""
    overrides: list[dict] = [parse_override(item) for item in args.overrides]
    model = {key: getattr(args, key) for key in MODEL_OPTIONS if getattr(args, key) is not None}
    extra: dict[str, Any] = {"policy": policy, "model": model}
    if args.device is not None:
        extra["device"] = args.device
    if args.precision is not None:
        extra["precision"] = args.precision
    pretrain: dict[str, Any] = {}
    if args.batch_size is not None:
        pretrain = {level: {"batch_size": args.batch_size} for level in ("pretrain", "finetune", "mask")}
    if total_steps is not None:
        pretrain["steps"] = total_steps
    extra["pretrain"] = pretrain
    return build_config(args.preset, args.config, [*overrides, extra])


def steps_per_iteration(config: RunConfig) -> int:
    """Pretrain steps in one MLO iteration: the finetune and mask levels step once per this many."""
    levels = config.pretrain
    return levels.pretrain.unroll_steps * levels.finetune.unroll_steps


# --------------------------------------------------------------------------- data, sizes, memory


def synthetic_dataset(config: RunConfig, num_images: int | None, seed: int = 0) -> LabelledDataset:
    """Random uint8 images of the model's size in :data:`NUM_CLASSES` classes, with a val split."""
    levels = config.pretrain
    largest = max(levels.pretrain.batch_size, levels.finetune.batch_size, levels.mask.batch_size)
    count = num_images or max(256, 2 * largest)
    size = config.model.img_size
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> ImageSplit:
        images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
        return ImageSplit(images, torch.randint(0, NUM_CLASSES, (n,), generator=generator))

    train = split(count)
    pixels = train.images.float().div_(255.0)
    mean = tuple(float(v) for v in pixels.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in pixels.std(dim=(0, 2, 3)))
    return LabelledDataset(
        name="synthetic",
        train=train,
        val=split(max(16, count // 4)),
        test=split(16),
        class_names=[f"class{i}" for i in range(NUM_CLASSES)],
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
    )


def count_parameters(config: RunConfig) -> dict[str, int]:
    """Parameters of the MAE, the policy and (for a learnable policy) the head, built on the meta
    device so that no memory is allocated."""
    learnable = policy_info(config.policy).learnable
    with torch.device("meta"):
        mae = MaskedAutoencoderViT(config.model)
        policy = create_policy(config.policy, policy_context(mae), config.policy_options)
        head = ClassifierHead(config.model.embed_dim, NUM_CLASSES, config.finetune.head_dropout)
    counts = {
        "mae": sum(p.numel() for p in mae.parameters()),
        "policy": sum(p.numel() for p in policy.parameters()),
        # the policy's parameters that the pretrain level trains (hpm's loss predictor)
        "policy_pretrain": sum(p.numel() for p in policy.pretrain_parameters()),
        "head": sum(p.numel() for p in head.parameters()) if learnable else 0,
    }
    policy_trained = counts["policy"] if learnable else counts["policy_pretrain"]
    counts["trained"] = counts["mae"] + policy_trained + counts["head"]
    return counts


def state_memory_lower_bound(parameters: dict[str, int], learnable: bool) -> int:
    """Bytes that the weights, gradients, AdamW moments and hypergradient copies need at least
    (activations not included)."""
    total = STATE_BYTES_PER_PARAMETER * parameters["trained"]
    if learnable:
        total += 4 * HYPERGRADIENT_COPIES * parameters["mae"] + 4 * 2 * parameters["policy"]
    return total


def available_memory(device: torch.device) -> int | None:
    """Free device memory on CUDA, ``MemAvailable`` on Linux; ``None`` when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in bytes."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def current_rss_bytes() -> int:
    current = _proc_status_bytes("VmRSS")
    return current if current is not None else peak_rss_bytes()[0]


def peak_rss_bytes() -> tuple[int, str]:
    """This process's peak resident set size and where it was read: ``VmHWM`` of
    ``/proc/self/status`` (Linux), else ``ru_maxrss``.

    ``VmHWM`` is preferred: after ``fork`` + ``exec``, ``ru_maxrss`` starts at the parent's RSS,
    so a small worker started by a large parent reports the parent's peak.
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak, "VmHWM"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024), "ru_maxrss"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> float | None:
    with contextlib.suppress(OSError):
        return os.getloadavg()[0]
    return None


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from ``/proc/stat`` (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return fields[3] + fields[4], sum(fields)
    return None


def busy_fraction(seconds: float = 0.5) -> float | None:
    """The share of the machine's CPU time that was not idle over the next ``seconds``."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return 1.0 - (after[0] - before[0]) / (after[1] - before[1])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- hardware


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device, precision: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compute": "bf16 autocast" if use_bf16(device, precision) else "fp32",
    }
    # Settings that change CPU speed a lot (glibc's malloc thresholds, thread counts, a preloaded
    # allocator); shown in the header when set.
    info["environment"] = {
        key: value for key, value in sorted(os.environ.items()) if key.startswith(ENVIRONMENT_PREFIXES)
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float) -> dict[str, Any] | None:
    """The dense matmul rate of ``device`` in ``dtype``, as FLOP/s: a square matmul (8192 on
    CUDA, 2048 on CPU) timed in chunks (10 matmuls on CUDA, 1 on CPU) for about ``seconds``; the
    best chunk counts, so that a moment of contention does not lower the reference."""
    if seconds <= 0:
        return None
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    chunk = 10 if device.type == "cuda" else 1
    for _ in range(3 * chunk):
        torch.mm(a, b)
    synchronize(device)
    rates: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(rates) < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(chunk):
            torch.mm(a, b)
        synchronize(device)
        rates.append(2 * size**3 * chunk / (time.perf_counter() - started))
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "flops_per_s": max(rates),
        "median_flops_per_s": statistics.median(rates),
        "chunks": len(rates),
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
    }


# --------------------------------------------------------------------------- one policy


def evaluation_text(counts: dict[str, int]) -> str:
    """``{"pretrain/step": 2, "pretrain/hypergradient": 2, ...}`` → ``pretrain: 2 step + 2
    hypergradient, ...`` (levels in MLO order; the finetune hypergradient evaluates the encoder)."""
    parts = []
    for level in ("pretrain", "finetune", "mask"):
        purposes = [
            f"{counts[key]} {key.split('/', 1)[1]}"
            + (" (encoder)" if key == "finetune/hypergradient" else "")
            for key in (f"{level}/step", f"{level}/hypergradient")
            if counts.get(key)
        ]
        if purposes:
            parts.append(f"{level}: {' + '.join(purposes)}")
    others = sorted(key for key in counts if key.split("/", 1)[0] not in ("pretrain", "finetune", "mask"))
    parts.extend(f"{key}: {counts[key]}" for key in others if counts[key])
    return ", ".join(parts)


def run_iteration(
    pretrainer: Pretrainer,
    device: torch.device,
    last_step: int,
    steps: int,
    flop_counter: FlopCounterMode | None = None,
) -> dict[str, Any]:
    """``steps`` calls of ``pretrainer.step`` after global step ``last_step``, each timed with
    CUDA synchronised around it; also the loss evaluations and level steps they took."""
    counts_before = Counter(pretrainer.objectives.counts)
    levels_before = pretrainer.mlo.step_counts()
    times = []
    cpu_before = cpu_seconds()
    with flop_counter if flop_counter is not None else contextlib.nullcontext():
        for step in range(last_step + 1, last_step + steps + 1):
            synchronize(device)
            started = time.perf_counter()
            pretrainer.step(step)
            synchronize(device)
            times.append(time.perf_counter() - started)
    cpu = cpu_seconds() - cpu_before
    counts = Counter(pretrainer.objectives.counts)
    counts.subtract(counts_before)
    levels_after = pretrainer.mlo.step_counts()
    return {
        "seconds": sum(times),
        "cpu_seconds": cpu,
        "step_seconds": times,
        "evaluations": {key: value for key, value in sorted(counts.items()) if value},
        "level_steps": {name: levels_after[name] - levels_before.get(name, 0) for name in levels_after},
    }


def benchmark_policy(args: argparse.Namespace, policy: str) -> dict[str, Any]:
    """Build the policy's levels, warm up, time ``args.iterations`` MLO iterations."""
    probe = make_config(args, policy)
    per_iteration = steps_per_iteration(probe)
    # One extra iteration in case the FLOPs are counted after timing (no warm-up).
    total_steps = per_iteration * (args.warmup + args.iterations + 1)
    config = make_config(args, policy, total_steps)
    device = select_device(config.device)
    learnable = policy_info(policy).learnable
    levels = config.pretrain
    result: dict[str, Any] = {
        "policy": policy,
        "status": "ok",
        "learnable": learnable,
        "steps_per_iteration": per_iteration,
        "batch_sizes": {
            "pretrain": levels.pretrain.batch_size,
            "finetune": levels.finetune.batch_size,
            "mask": levels.mask.batch_size,
        },
        "unroll_steps": {
            "pretrain": levels.pretrain.unroll_steps,
            "finetune": levels.finetune.unroll_steps,
            "mask": levels.mask.unroll_steps,
        },
        "hypergradient": levels.mask.hypergradient if learnable else None,
    }
    parameters = count_parameters(config)
    result["parameters"] = parameters
    lower_bound = state_memory_lower_bound(parameters, learnable)
    available = available_memory(device)
    result["memory_lower_bound_bytes"] = lower_bound
    result["memory_available_bytes"] = available
    if available is not None and lower_bound > available:
        result["status"] = "skipped"
        what = "weights, gradients, AdamW state" + (" and hypergradient copies" if learnable else "")
        result["error"] = (
            f"does not fit: {what} alone need ≥ {format_bytes(lower_bound)}, "
            f"{format_bytes(available)} available on {device}"
        )
        return result

    dataset = synthetic_dataset(config, args.num_images, seed=config.seed)
    if policy_info(policy).requires:  # a guided policy: the weight-free centre prior stands in
        dataset = computed_priors(dataset, create_provider("center"))
    splits = make_splits(dataset, config.data.train_portion, config.data.mask_source)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        memory_before = torch.cuda.memory_allocated(device)
    else:
        peak_was_reset = reset_peak_rss()
        memory_before = current_rss_bytes()

    setup_started = time.perf_counter()
    mae, mask_policy, head = build_models(config, NUM_CLASSES, device)
    with tempfile.TemporaryDirectory(prefix="maskkit-step-time-") as run_path:
        context = RunContext(
            config, device, dataset, splits, RunDir(Path(run_path)), Console(stderr=True, quiet=True)
        )
        pretrainer = Pretrainer(context, mae, mask_policy, head if mask_policy.learnable else None)
        result["setup_seconds"] = time.perf_counter() - setup_started
        step = 0
        flop_counter: FlopCounterMode | None = None
        for index in range(args.warmup):
            stderr.print(f"  {policy}: warm-up iteration {index + 1}/{args.warmup}")
            counter = FlopCounterMode(display=False) if args.flops and index == 0 else None
            run_iteration(pretrainer, device, step, per_iteration, counter)
            flop_counter = flop_counter or counter
            step += per_iteration
        timed = []
        result["load_average_before"] = load_average()
        for index in range(args.iterations):
            timed.append(run_iteration(pretrainer, device, step, per_iteration))
            step += per_iteration
            stderr.print(f"  {policy}: iteration {index + 1}/{args.iterations}: {timed[-1]['seconds']:.3f} s")
        if args.flops and flop_counter is None:
            stderr.print(f"  {policy}: counting FLOPs over one more iteration")
            flop_counter = FlopCounterMode(display=False)
            run_iteration(pretrainer, device, step, per_iteration, flop_counter)

        synchronize(device)
        if device.type == "cuda":
            memory = {
                "kind": "cuda_max_memory_allocated",
                "peak_bytes": torch.cuda.max_memory_allocated(device),
                "before_bytes": memory_before,
            }
        else:
            peak, source = peak_rss_bytes()
            memory = {
                "kind": "process_peak_rss",
                "source": source,
                "peak_reset_before_policy": peak_was_reset,
                "peak_bytes": peak,
                "before_bytes": memory_before,
                "fresh_process": args.worker is not None,
            }
        memory["increase_bytes"] = max(0, memory["peak_bytes"] - memory_before)
        result["memory"] = memory

    seconds = [item["seconds"] for item in timed]
    median = statistics.median(seconds)
    # Below 1 on CPU: the process got less than its threads' worth of CPU (another process ran).
    result["cpu_utilisation"] = sum(item["cpu_seconds"] for item in timed) / (
        sum(seconds) * torch.get_num_threads()
    )
    evaluations = [item["evaluations"] for item in timed]
    result.update(
        {
            "iteration_seconds": seconds,
            "step_seconds": [item["step_seconds"] for item in timed],
            # Median time of the i-th step of an iteration: with 2/1/1 the last one also runs the
            # finetune and mask steps and the hypergradient.
            "step_position_median_s": [
                statistics.median(item["step_seconds"][position] for item in timed)
                for position in range(per_iteration)
            ],
            "median_iteration_s": median,
            "min_iteration_s": min(seconds),
            "max_iteration_s": max(seconds),
            "per_pretrain_step_s": median / per_iteration,
            "images_per_s": levels.pretrain.batch_size * per_iteration / median,
            "loss_evaluations": evaluations[-1],
            "loss_evaluations_consistent": all(item == evaluations[-1] for item in evaluations),
            "loss_evaluations_text": evaluation_text(evaluations[-1]),
            "level_steps_per_iteration": timed[-1]["level_steps"],
            "flops_per_iteration": flop_counter.get_total_flops() if flop_counter is not None else None,
        }
    )
    flops = result["flops_per_iteration"]
    result["achieved_flops_per_s"] = flops / median if flops else None
    return result


def run_policy(args: argparse.Namespace, policy: str) -> dict[str, Any]:
    """:func:`benchmark_policy` with errors turned into a row, not a crash."""
    try:
        return benchmark_policy(args, policy)
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        return {"policy": policy, "status": "failed", "error": f"out of memory: {error}".splitlines()[0]}
    except MaskkitError as error:
        return {"policy": policy, "status": "failed", "error": str(error)}
    except Exception as error:
        traceback.print_exc()
        return {"policy": policy, "status": "failed", "error": f"{type(error).__name__}: {error}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_policy_subprocess(argv: list[str], policy: str) -> dict[str, Any]:
    """Run one policy in a fresh interpreter (``--worker``) and read its result back."""
    with tempfile.TemporaryDirectory(prefix="maskkit-step-time-") as folder:
        output = Path(folder) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), *argv]
        command += ["--worker", policy, "--worker-output", str(output)]
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
        if completed.returncode == 0 and output.is_file():
            return json.loads(output.read_text())
    if completed.returncode == -9:
        reason = "killed by SIGKILL (most likely out of memory)"
    elif completed.returncode < 0:
        reason = f"killed by signal {-completed.returncode}"
    else:
        reason = f"worker exited with status {completed.returncode}"
    return {"policy": policy, "status": "failed", "error": reason}


# --------------------------------------------------------------------------- output


def format_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_si(value: float | None, unit: str = "") -> str:
    if value is None or value == 0:
        return "–"
    exponent = min(max(math.floor(math.log10(abs(value)) / 3), 0), 5)
    prefix = ("", "k", "M", "G", "T", "P")[exponent]
    scaled = value / 1000**exponent
    digits = 0 if scaled >= 100 else 1 if scaled >= 10 else 2
    return f"{scaled:.{digits}f} {prefix}{unit}".rstrip()


def format_seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def format_count(value: int | None) -> str:
    return format_si(value) if value else "0"


def add_derived(results: list[dict[str, Any]], peak: dict[str, Any] | None) -> None:
    """The ratio to ``random`` and the fraction of the matmul peak, filled in per row."""
    baseline = next(
        (row for row in results if row.get("policy") == "random" and row.get("status") == "ok"), None
    )
    for row in results:
        if row.get("status") != "ok":
            continue
        row["ratio_vs_random"] = (
            row["median_iteration_s"] / baseline["median_iteration_s"] if baseline is not None else None
        )
        achieved = row.get("achieved_flops_per_s")
        row["fraction_of_matmul_peak"] = achieved / peak["flops_per_s"] if achieved and peak else None


def describe_setup(meta: dict[str, Any], results: list[dict[str, Any]]) -> list[str]:
    """The lines above the tables: command, hardware, date, model and what was measured."""
    info, model, run = meta["hardware"], meta["model"], meta["run"]
    on_cuda = info["device"].startswith("cuda")
    if on_cuda:
        machine = f"{info['gpu']} (CUDA {info['cuda']}); host CPU {info['cpu']}, {info['cpu_cores']} cores"
    else:
        machine = f"CPU {info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} torch threads"
    peak = meta.get("matmul_peak")
    peak_text = (
        f"; dense matmul rate {format_si(peak['flops_per_s'], 'FLOP/s')} "
        f"({peak['size']}×{peak['size']} {peak['dtype']} matmuls, best of {peak['chunks']} timings; "
        "the reference for the % column)"
        if peak
        else ""
    )
    if on_cuda:
        memory = (
            "`torch.cuda.max_memory_allocated`, reset before each policy (model build and all iterations)"
        )
    else:
        where = (
            "a fresh Python process per policy" if run["policy_subprocess"] else "the benchmarking process"
        )
        memory = (
            "**process** peak RSS (`VmHWM`, reset before each policy) of "
            f"{where}, including torch and the Python runtime; (+x) is the increase over the RSS "
            "just before the models were built"
        )
    lines = [
        f"Command: `{meta['command']}`",
        f"Hardware: {machine}; torch {info['torch']}, Python {info['python']}, {info['compute']}{peak_text}",
        f"Date: {meta['date']}",
        *(
            [f"Environment: {' '.join(f'{key}={value}' for key, value in info['environment'].items())}"]
            if info.get("environment")
            else []
        ),
        f"Model (preset `{meta['preset']}`): encoder {model['embed_dim']}×{model['depth']} "
        f"({model['num_heads']} heads), patch {model['patch_size']} at {model['img_size']} px "
        f"({model['num_patches']} patches), decoder {model['decoder_embed_dim']}×{model['decoder_depth']} "
        f"({model['decoder_num_heads']} heads); mask ratio {meta['mask_ratio']}; batch "
        f"{run['batch_sizes']} and unroll {run['unroll']} (pretrain/finetune/mask); "
        f"hypergradient `{run['hypergradient']}`",
        f"One MLO iteration = {run['steps_per_iteration']} pretrain steps, plus one finetune and one "
        "mask step with the mask level's hypergradient for a learnable policy; times are medians "
        f"(min–max) of {run['iterations']} iteration{'s' if run['iterations'] != 1 else ''} after "
        f"{run['warmup']} warm-up; synthetic data "
        f"({NUM_CLASSES} classes)",
        f"Peak memory: {memory}",
    ]
    if not on_cuda:
        busy = [
            f"{row['policy']} {100 * row['cpu_utilisation']:.0f} %"
            for row in results
            if row.get("cpu_utilisation") is not None
        ]
        lines.append(
            "CPU use during the timed iterations (process CPU time / (wall time × threads); well "
            "below 100 % means another process competed for the cores): " + (", ".join(busy) or "–")
        )
    return lines


def time_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = [
        "policy",
        "s / MLO iteration",
        "s / pretrain step",
        "× random",
        "images/s",
        "FLOP / iteration",
        "achieved FLOP/s",
        "% of matmul rate",
    ]
    rows = []
    for row in results:
        if row.get("status") != "ok":
            rows.append([row["policy"], f"{row['status']} (see below)"] + [""] * (len(headers) - 2))
            continue
        ratio = row.get("ratio_vs_random")
        fraction = row.get("fraction_of_matmul_peak")
        spread = ""
        if len(row["iteration_seconds"]) > 1:
            spread = f" ({format_seconds(row['min_iteration_s'])}–{format_seconds(row['max_iteration_s'])})"
        rows.append(
            [
                row["policy"],
                format_seconds(row["median_iteration_s"]) + spread,
                format_seconds(row["per_pretrain_step_s"]),
                f"{ratio:.2f}×" if ratio is not None else "–",
                f"{row['images_per_s']:.1f}",
                format_si(row["flops_per_iteration"], "FLOP"),
                format_si(row["achieved_flops_per_s"], "FLOP/s"),
                f"{100 * fraction:.1f} %" if fraction is not None else "–",
            ]
        )
    return headers, rows


def cost_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["policy", "peak memory", "parameters: MAE + policy + head", "loss evaluations per iteration"]
    rows = []
    for row in results:
        params = row.get("parameters")
        parameter_text = ""
        if params is not None:
            parameter_text = f"{format_count(params['mae'])} + {format_count(params['policy'])}"
            if row["learnable"]:
                parameter_text += f" + {format_count(params['head'])}"
            elif params.get("policy_pretrain"):
                parameter_text += " (pretrain level)"
            else:
                parameter_text += " (not trained)"
        if row.get("status") != "ok":
            rows.append([row["policy"], f"{row['status']}", parameter_text, row.get("error", "")])
            continue
        memory = row["memory"]
        rows.append(
            [
                row["policy"],
                f"{format_bytes(memory['peak_bytes'])} (+{format_bytes(memory['increase_bytes'])})",
                parameter_text,
                row["loss_evaluations_text"] or "–",
            ]
        )
    return headers, rows


LEFT_COLUMNS = {"policy", "parameters: MAE + policy + head", "loss evaluations per iteration"}


def rich_tables(results: list[dict[str, Any]]) -> list[Table]:
    tables = []
    for title, (headers, rows) in (
        ("Step time per MLO iteration", time_table(results)),
        ("Cost per MLO iteration", cost_table(results)),
    ):
        table = Table(title=title, title_justify="left")
        for header in headers:
            table.add_column(header, justify="left" if header in LEFT_COLUMNS else "right")
        for row in rows:
            table.add_row(*row)
        tables.append(table)
    return tables


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---" if header in LEFT_COLUMNS else "--:" for header in headers]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
    return lines


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"- {line}" for line in describe_setup(meta, results)]
    lines += ["", *markdown_table(*time_table(results)), "", *markdown_table(*cost_table(results))]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.worker is not None:
        result = run_policy(args, args.worker)
        if args.worker_output is None:
            print(json.dumps(result, indent=2))
        else:
            args.worker_output.write_text(json.dumps(result))
        return 0

    try:
        config = make_config(args, args.policy_list[0])
        for name in args.policy_list:
            policy_info(name)
        device = select_device(config.device)
    except MaskkitError as error:
        stderr.print(f"[red]error:[/] {error}")
        return 2
    precision = config.precision
    compute_dtype = torch.bfloat16 if use_bf16(device, precision) else torch.float32
    meta: dict[str, Any] = {
        "command": "python benchmarks/step_time.py " + shlex.join(argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "preset": args.preset,
        "hardware": hardware(device, precision),
        "model": {**config.model.model_dump(), "num_patches": config.model.num_patches},
        "mask_ratio": config.mask_ratio,
        "run": {
            "iterations": args.iterations,
            "warmup": args.warmup,
            "steps_per_iteration": steps_per_iteration(config),
            "batch_sizes": "/".join(
                str(getattr(config.pretrain, level).batch_size) for level in ("pretrain", "finetune", "mask")
            ),
            "unroll": "/".join(
                str(getattr(config.pretrain, level).unroll_steps)
                for level in ("pretrain", "finetune", "mask")
            ),
            "hypergradient": config.pretrain.mask.hypergradient,
            "policy_subprocess": args.policy_subprocess,
            "num_images": args.num_images,
        },
    }
    meta["load_average_before"] = load_average()
    meta["cpu_busy_before"] = busy = busy_fraction()
    if device.type == "cpu" and busy is not None and busy > 0.2:
        stderr.print(
            f"[yellow]warning:[/] {100 * busy:.0f} % of the CPU is busy before the benchmark starts: "
            "other processes compete for the cores, so the times will come out inflated"
        )
    if args.peak_seconds > 0:
        dtype_name = str(compute_dtype).removeprefix("torch.")
        stderr.print(f"measuring the dense {dtype_name} matmul rate on {device}")
    meta["matmul_peak"] = matmul_peak(device, compute_dtype, args.peak_seconds)

    results = []
    for policy in args.policy_list:
        stderr.print(f"[bold]{policy}[/]")
        if args.policy_subprocess:
            results.append(run_policy_subprocess(argv, policy))
        else:
            results.append(run_policy(args, policy))
        if results[-1].get("status") != "ok":
            stderr.print(f"  [yellow]{policy}: {results[-1]['status']}: {results[-1].get('error')}[/]")
    add_derived(results, meta["matmul_peak"])

    console = Console()
    for table in rich_tables(results):
        console.print(table)
    for line in describe_setup(meta, results):
        console.print(line, highlight=False, markup=False)
    if args.markdown is not None:
        text = markdown(results, meta)
        if args.markdown == "-":
            print()
            print(text, end="")
        else:
            Path(args.markdown).write_text(text)
            stderr.print(f"markdown: {args.markdown}")
    if args.json is not None:
        args.json.write_text(json.dumps({**meta, "results": results}, indent=2))
        stderr.print(f"json: {args.json}")
    return 1 if any(row.get("status") == "failed" for row in results) else 0


if __name__ == "__main__":
    sys.exit(main())
