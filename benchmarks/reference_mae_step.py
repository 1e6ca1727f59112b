"""The plain MAE pretrain step of the reference implementation beside maskkit's, on one machine.

Issue 8 quotes the reference's plain MAE step (its baseline mode) at 0.454 s and maskkit's at
0.484 s, measured on another machine. This script times both on *this* machine, in one process,
interleaved round by round, at issue 8's reference configuration (encoder 192×12, patch 2 at
32 px, decoder 128×4, batch 8, fp32, one thread by default), and profiles one of each step so
that a difference can be traced to the ops that make it.

It imports the reference's model from a clone of the public repository (``cifar_mae_model.py``
of Alexiland/MLO-MAE); nothing of it is copied into maskkit. The reference step is its baseline
pretrain step as its ``Pretraining.training_step`` writes it (patch embedding and positions,
uniform-noise masking through ``MLOPatchMasking(random=True)``, encoder and decoder, norm-pix
loss on the masked patches), followed by a backward pass and an AdamW step over timm's weight
decay groups. maskkit's is the same computation through ``maskkit``'s ``random`` policy: once
bare (``pretrain_loss``, backward, AdamW) and once through the engine (``Pretrainer.step``, what
``maskkit train`` runs). The reference's own engine (betty 0.2.1) is not run.

    python benchmarks/reference_mae_step.py --reference-repo PATH/TO/MLO-MAE --iterations 20
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from steptime.workloads import REFERENCE_MODEL
from timm.optim import param_groups_weight_decay
from torch import nn

from maskkit.config import build_config
from maskkit.cost import workload
from maskkit.cost.machine import cpu_model
from maskkit.runtime import tune_cpu_runtime

MASK_RATIO = 0.75


def load_reference_model(repository: Path) -> types.ModuleType:
    """``cifar_mae_model`` of a clone of the reference repository. It imports ``einops`` without
    using it in the MAE; a stand-in module is installed when einops is missing."""
    if not (repository / "cifar_mae_model.py").is_file():
        sys.exit(f"error: {repository} has no cifar_mae_model.py; pass a clone of Alexiland/MLO-MAE")
    if importlib.util.find_spec("einops") is None:
        stand_in = types.ModuleType("einops")
        stand_in.repeat = stand_in.rearrange = None
        sys.modules["einops"] = stand_in
    sys.path.insert(0, str(repository))
    return importlib.import_module("cifar_mae_model")


def reference_step(reference: types.ModuleType, images: torch.Tensor) -> Callable[[], float]:
    """One baseline pretrain step of the reference: forward, loss, backward, AdamW."""
    model = reference.MaskedAutoencoderViT(
        **REFERENCE_MODEL,
        in_chans=3,
        mlp_ratio=4.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss=True,
    )
    masking = reference.MLOPatchMasking(in_features=1, out_features=1, hidden_size=1)  # random=True
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, 1e-3), lr=1e-4, betas=(0.9, 0.95))

    def step() -> float:
        x = model.patch_embed(images) + model.pos_embed[:, 1:, :]
        x, mask, ids_restore, _ = masking(x, MASK_RATIO, random=True)
        pred = model(x, mask, ids_restore)
        target = model.patchify(images)
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        loss = (loss * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    return step


def maskkit_steps(
    images: torch.Tensor, stack: contextlib.ExitStack
) -> tuple[Callable[[], float], Callable[[], float]]:
    """maskkit's ``random`` pretrain step, bare and through the engine (two separate models)."""
    levels = {"batch_size": images.shape[0], "unroll_steps": 1}
    config = build_config(
        "cpu",
        None,
        [
            {
                "policy": "random",
                "model": REFERENCE_MODEL,
                "device": "cpu",
                "precision": "fp32",
                "pretrain": {"steps": 10_000, "mae": levels, "head": levels, "mask": levels},
            }
        ],
    )
    dataset = workload.synthetic_dataset(config, 64)
    splits = workload.synthetic_splits(config, dataset)
    engine = stack.enter_context(workload.built_pretrainer(config, dataset, splits, torch.device("cpu")))
    counter = iter(range(1, 10**9))

    def engine_step() -> float:
        engine.step(next(counter))
        return 0.0

    bare = stack.enter_context(workload.built_pretrainer(config, dataset, splits, torch.device("cpu")))
    optimizer = bare.mlo.levels["pretrain"].spec.optimizer
    batch = bare.batches["pretrain"].next()
    batch = batch._replace(images=images)

    def bare_step() -> float:
        loss = bare.objectives.pretrain_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    return bare_step, engine_step


def time_rounds(
    steps: dict[str, Callable[[], float]], iterations: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per step of each, interleaved: round k runs every step once, in turn."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iterations):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return times


def op_profile(step: Callable[[], float], repeats: int = 3) -> dict[str, float]:
    """Self CPU seconds per op name over ``repeats`` steps, per step."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(repeats):
            step()
    return {event.key: event.self_cpu_time_total / 1e6 / repeats for event in profiler.key_averages()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-repo", type=Path, required=True, help="a clone of Alexiland/MLO-MAE")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top", type=int, default=14, help="ops listed in the profile table")
    parser.add_argument("--no-cpu-tuning", dest="cpu_tuning", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_tuning:
        tune_cpu_runtime()
    reference = load_reference_model(args.reference_repo)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, REFERENCE_MODEL["img_size"], REFERENCE_MODEL["img_size"])
    with contextlib.ExitStack() as stack:
        bare, engine = maskkit_steps(images, stack)
        steps = {
            "reference": reference_step(reference, images),
            "maskkit (bare)": bare,
            "maskkit (engine)": engine,
        }
        times = time_rounds(steps, args.iterations, args.warmup)
        profiles = {name: op_profile(steps[name]) for name in ("reference", "maskkit (bare)")}
    base = statistics.median(times["reference"])
    print(f"Command: `python {' '.join(sys.argv)}`")
    print(
        f"Hardware: {cpu_model()}; torch {torch.__version__}, {args.threads} thread(s), "
        f"batch {args.batch_size}, fp32, CPU tuning {args.cpu_tuning}"
    )
    print(f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| step | median | min–max | ÷ reference |\n|---|--:|--:|--:|")
    for name, values in times.items():
        median = statistics.median(values)
        spread = f"{min(values) * 1e3:.1f}–{max(values) * 1e3:.1f} ms"
        print(f"| {name} | {median * 1e3:.1f} ms | {spread} | {median / base:.3f}× |")
    names = sorted(
        set(profiles["reference"]) | set(profiles["maskkit (bare)"]),
        key=lambda op: -max(profiles["reference"].get(op, 0.0), profiles["maskkit (bare)"].get(op, 0.0)),
    )
    print("\nSelf CPU time per step by op (torch.profiler, 3 steps each):\n")
    print("| op | reference | maskkit (bare) | difference |\n|---|--:|--:|--:|")
    for op in names[: args.top]:
        ours, theirs = profiles["maskkit (bare)"].get(op, 0.0), profiles["reference"].get(op, 0.0)
        print(f"| `{op}` | {theirs * 1e3:.1f} ms | {ours * 1e3:.1f} ms | {(ours - theirs) * 1e3:+.1f} ms |")
    totals = {name: sum(profile.values()) for name, profile in profiles.items()}
    print(
        f"| all ops | {totals['reference'] * 1e3:.1f} ms | {totals['maskkit (bare)'] * 1e3:.1f} ms "
        f"| {(totals['maskkit (bare)'] - totals['reference']) * 1e3:+.1f} ms |"
    )


if __name__ == "__main__":
    main()
