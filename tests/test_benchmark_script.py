"""``benchmarks/step_time.py``: its parts and the ``maskkit.cost`` ones it is built on (the breakdown,
the compared settings, issue 8's reference figures) on smoke-sized models, and the script end to end
at the smoke preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd.profiler import record_function

from maskkit.cost.breakdown import (
    ENGINE_PARTS,
    OPTIMIZER,
    OTHER,
    ScopeFlopCounter,
    attribute_self_times,
    make_breakdown,
    time_profiler,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "step_time.py"
sys.path.insert(0, str(BENCHMARKS))

from steptime.main import planned_runs  # noqa: E402
from steptime.options import parse_args  # noqa: E402
from steptime.reference import QUOTED_FIGURES, compare  # noqa: E402
from steptime.report import add_derived, markdown  # noqa: E402
from steptime.runner import benchmark_policy  # noqa: E402
from steptime.variants import Variant, expand_variants  # noqa: E402
from steptime.workload import make_config  # noqa: E402
from steptime.workloads import REFERENCE_MODEL  # noqa: E402

POLICIES = ("random", "mlo", "mlo-light", "blockwise", "hpm")
#: A smoke-preset run small enough for a unit test: one iteration, nothing else.
QUICK = [
    "--preset",
    "smoke",
    "--batch-size",
    "8",
    "--iterations",
    "1",
    "--warmup",
    "0",
    "--peak-seconds",
    "0",
]
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- the breakdown


def _labelled_matmuls(size: int = 64) -> None:
    """One matmul under pretrain forward, one under product.pretrain nested in it, one outside
    every labelled scope, and one under an unlabelled scope inside mask backward."""
    a = torch.randn(size, size)
    with record_function("maskkit.pretrain.forward"):
        a @ a
        with record_function("maskkit.product.pretrain"):
            a @ a
    a @ a
    with record_function("maskkit.mask.backward"), record_function("some.other.label"):
        a @ a


def test_scope_flop_counter_charges_each_op_to_the_innermost_labelled_scope() -> None:
    with ScopeFlopCounter() as counter:
        _labelled_matmuls(64)
    matmul = 2 * 64**3
    assert counter.total_flops == 4 * matmul
    assert counter.flops["maskkit.pretrain.forward"] == matmul
    assert counter.flops["maskkit.product.pretrain"] == matmul
    assert counter.flops["maskkit.mask.backward"] == matmul  # an unlabelled scope inside counts to it
    assert counter.flops[OTHER] == matmul
    assert sum(counter.flops.values()) == counter.total_flops
    assert counter.calls["maskkit.pretrain.forward"] == 1 and "some.other.label" not in counter.calls


def test_profiled_self_times_go_to_their_labelled_scopes_and_add_up() -> None:
    profiler = time_profiler(CPU)
    with profiler:
        _labelled_matmuls(256)
    seconds, calls = attribute_self_times(profiler.events(), CPU)
    assert {"maskkit.pretrain.forward", "maskkit.product.pretrain", "maskkit.mask.backward"} <= set(seconds)
    assert all(value > 0 for value in seconds.values())
    assert calls["maskkit.product.pretrain"] == 1
    breakdown = make_breakdown(CPU, 1.0, seconds, calls, None)
    assert sum(part.seconds for part in breakdown.parts) == pytest.approx(1.0)
    assert breakdown.parts[-1].part == OTHER and breakdown.parts[-1].seconds > 0


def test_an_mlo_iteration_breaks_down_into_every_level_and_product() -> None:
    args = parse_args([*QUICK, "--no-policy-subprocess", "--unroll", "1/1/1"])
    row = benchmark_policy(args, "mlo")
    assert row["status"] == "ok", row.get("error")
    breakdown = row["breakdown"]
    parts = {part["part"]: part for part in breakdown["parts"]}
    assert set(ENGINE_PARTS) <= set(parts), "every engine label must show up in an MLO iteration"
    for key in ENGINE_PARTS:
        assert parts[key]["calls"] >= 1 and parts[key]["seconds"] > 0, key
    assert parts["maskkit.product.pretrain"]["flops"] > 0
    assert parts[OPTIMIZER]["calls"] == 3  # one AdamW step per level at 1/1/1
    # The parts add up to the profiled iteration's wall time and to the FLOP counter's total,
    # which is the FLOP / iteration column; the labelled parts alone stay within the wall time.
    total_s = breakdown["total_seconds"]
    assert sum(part["seconds"] for part in parts.values()) == pytest.approx(total_s, rel=1e-6)
    assert parts[OTHER]["seconds"] >= -0.02 * total_s
    assert sum(part["flops"] for part in parts.values()) == breakdown["total_flops"]
    assert breakdown["total_flops"] == row["flops_per_iteration"]


def test_a_plain_mae_iteration_has_only_the_pretrain_level() -> None:
    row = benchmark_policy(parse_args([*QUICK, "--no-policy-subprocess"]), "random")
    labelled = {part["part"] for part in row["breakdown"]["parts"] if part["part"].startswith("maskkit.")}
    assert labelled == {"maskkit.pretrain.forward", "maskkit.pretrain.backward"}


# --------------------------------------------------------------------------- settings compared


def test_variants_are_every_combination_of_the_values_given() -> None:
    variants = expand_variants("1/1/1,2/1/1", "exact,finite-difference", "1,4")
    assert len(variants) == 8
    assert variants[0] == Variant("1/1/1", "exact", 1)
    assert variants[-1].label == "unroll 2/1/1, finite-difference, mask every 4"
    override = Variant("2/1/1", "finite-difference", 4).config_override()
    assert override["mae"]["unroll_steps"] == 2
    assert override["head"]["unroll_steps"] == 4  # --mask-every wins over --unroll's finetune part
    assert override["hypergradient"]["darts_mode"] == "finite-difference"
    assert expand_variants(None, None, None) == [Variant()]
    for bad in (("1/1", None, None), (None, "central", None), (None, None, "0")):
        with pytest.raises(ValueError):
            expand_variants(*bad)


def test_the_baseline_runs_once_and_learnable_policies_once_per_setting() -> None:
    args = parse_args([*QUICK, "--policies", "mlo,random", "--unroll", "1/1/1,2/1/1"])
    assert planned_runs(args) == [("random", 0), ("mlo", 0), ("mlo", 1)]
    assert planned_runs(parse_args([*QUICK, "--policies", "mlo,random"])) == [("mlo", 0), ("random", 0)]


def test_the_reference_workload_sets_issue_8s_configuration_and_flags_win() -> None:
    args = parse_args(["--preset", "reference-cpu"])
    assert args.config_preset == "cpu"
    model = make_config(args, "mlo").model
    assert {key: getattr(model, key) for key in REFERENCE_MODEL} == REFERENCE_MODEL
    deeper = make_config(parse_args(["--preset", "reference-cpu", "--set", "model.depth=6"]), "mlo").model
    assert deeper.depth == 6 and deeper.embed_dim == REFERENCE_MODEL["embed_dim"]
    assert (args.batch_size, args.threads, args.device, args.unroll) == (8, 1, "cpu", "1/1/1")
    assert args.policy_list == ["random", "mlo"]
    args = parse_args(["--preset", "reference-cpu", "--batch-size", "32", "--unroll", "1/1/1,2/1/1"])
    assert args.batch_size == 32 and [v.unroll for v in args.variants] == ["1/1/1", "2/1/1"]


# --------------------------------------------------------------------------- issue 8's figures


def _reference_meta(threads: int = 1, batch: int = 8) -> dict:
    return {
        "model": {**REFERENCE_MODEL, "num_patches": 256},
        "run": {"batch_sizes": f"{batch}/{batch}/{batch}"},
        "hardware": {"torch_threads": threads, "device": "cpu", "compute": "fp32"},
    }


def _row(policy: str, unroll: dict, iteration_s: float, steps: int, flops: float, label: str) -> dict:
    return {
        "policy": policy,
        "status": "ok",
        "unroll_steps": unroll,
        "median_iteration_s": iteration_s,
        "per_pretrain_step_s": iteration_s / steps,
        "flops_per_iteration": flops,
        "variant_label": label,
    }


def test_the_quoted_figures_sit_beside_this_run_and_the_goal_is_checked() -> None:
    one, two = {"pretrain": 1, "finetune": 1, "mask": 1}, {"pretrain": 2, "finetune": 1, "mask": 1}
    results = [
        _row("random", one, 0.4, 1, 30e9, "pretrain level only"),
        _row("mlo", one, 2.0, 1, 130e9, "unroll 1/1/1"),
        _row("mlo", two, 3.0, 2, 170e9, "unroll 2/1/1"),
    ]
    add_derived(results, None)
    assert results[1]["ratio_vs_random"] == pytest.approx(5.0)
    assert results[2]["ratio_vs_random"] == pytest.approx(3.75)  # per pretrain step
    comparison = compare(results, _reference_meta())
    figures = {(row["label"], row["setting"]): row for row in comparison["figures"]}
    assert len(figures) == len(QUOTED_FIGURES)
    iteration = figures[("MLO iteration", "reference configuration")]
    assert (iteration["reference"], iteration["maskkit_at_filing"], iteration["this_run"]) == (
        5.11,
        4.02,
        2.0,
    )
    assert figures[("plain MAE step (baseline)", "reference configuration")]["this_run"] == 0.4
    assert figures[("MLO iteration", "batch 32")]["this_run"] is None  # another batch: not run here
    goal = comparison["goal"]
    assert goal["evaluated"]
    results_by_metric = {check["metric"]: check["passed"] for check in goal["checks"]}
    assert results_by_metric == {
        "flops_per_iteration": True,
        "mlo_iteration_s": True,
        "mlo_over_mae": True,
        "mae_step_s": True,
    }

    elsewhere = compare(results, _reference_meta(threads=2))
    assert not elsewhere["goal"]["evaluated"]
    assert any("threads" in reason for reason in elsewhere["goal"]["not_comparable"])
    assert all(row["this_run"] is None for row in elsewhere["figures"])


# --------------------------------------------------------------------------- end to end


def _run(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    output = tmp_path / "out.json"
    command = [sys.executable, str(SCRIPT), *options, "--json", str(output), "--markdown"]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert list(tmp_path.iterdir()) == [output], "the script must write nothing but its --json file"
    return completed, json.loads(output.read_text())


@pytest.mark.slow
def test_step_time_script_reports_every_policy(tmp_path: Path) -> None:
    completed, report = _run(
        tmp_path,
        *("--preset", "smoke", "--policies", ",".join(POLICIES), "--iterations", "1", "--warmup", "0"),
        *("--peak-seconds", "0.1"),
        # One process for all policies: each fresh worker would import torch again (seconds).
        "--no-policy-subprocess",
    )
    assert "| policy |" in completed.stdout
    assert "**Breakdown of one mlo iteration**" in completed.stdout
    assert "| product at the pretrain level |" in completed.stdout
    # Issue 8's figures are always printed, labelled as quoted, with its goal.
    assert "5.11 s" in completed.stdout and "284 GFLOP" in completed.stdout
    assert "quoted from issue 8" in completed.stdout and "not re-measured" in completed.stdout
    assert "MLO ÷ MAE ≤ 5×" in completed.stdout

    rows = {row["policy"]: row for row in report["results"]}
    assert set(rows) == set(POLICIES)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("error"))
        assert row["median_iteration_s"] > 0
        assert row["per_pretrain_step_s"] > 0
        assert all(seconds > 0 for seconds in row["iteration_seconds"])
        assert row["flops_per_iteration"] > 0
        assert row["images_per_s"] > 0
        assert row["memory"]["peak_bytes"] > 0
        assert row["parameters"]["mae"] > 0
        assert row["steps_per_iteration"] == 2  # the smoke preset's 2/1/1 unroll
        assert row["breakdown"]["total_flops"] == row["flops_per_iteration"]

    random, mlo = rows["random"], rows["mlo"]
    assert random["loss_evaluations"] == {"pretrain/step": 2}
    assert not any(key.endswith("/hypergradient") for key in random["loss_evaluations"])
    assert random["level_steps_per_iteration"] == {"pretrain": 2}
    assert random["ratio_vs_random"] == pytest.approx(1.0)

    assert mlo["loss_evaluations"]["pretrain/step"] == 2
    assert mlo["loss_evaluations"]["pretrain/hypergradient"] > 0
    # The finetune product reuses the features of the finetune step (E has not moved since).
    assert mlo["loss_evaluations"]["finetune/step"] == 1
    assert mlo["loss_evaluations"].get("finetune/hypergradient", 0) == 0
    assert mlo["loss_evaluations"]["mask/step"] == 1
    assert mlo["level_steps_per_iteration"] == {"pretrain": 2, "finetune": 1, "mask": 1}
    assert mlo["parameters"]["policy"] > rows["mlo-light"]["parameters"]["policy"]
    # The hypergradient costs extra forward/backward work over the same pretrain steps.
    assert mlo["flops_per_iteration"] > random["flops_per_iteration"]

    # blockwise and hpm run the pretrain level alone; hpm's predictor trains inside its steps.
    blockwise, hpm = rows["blockwise"], rows["hpm"]
    for row in (blockwise, hpm):
        assert row["loss_evaluations"] == {"pretrain/step": 2}
        assert row["level_steps_per_iteration"] == {"pretrain": 2}
    assert blockwise["parameters"]["policy"] == 0
    assert hpm["parameters"]["policy"] == hpm["parameters"]["policy_pretrain"] > 0
    assert hpm["parameters"]["trained"] == hpm["parameters"]["mae"] + hpm["parameters"]["policy_pretrain"]
    assert hpm["flops_per_iteration"] > random["flops_per_iteration"]  # the predictor's passes
    assert "(pretrain level)" in completed.stdout and "(not trained)" in completed.stdout
    assert report["cpu_tuning"]["enabled"] and report["cpu_tuning"]["applied"]
    assert report["reference_comparison"]["goal"]["evaluated"] is False


@pytest.mark.slow
def test_step_time_script_compares_unroll_settings_in_fresh_workers(tmp_path: Path) -> None:
    completed, report = _run(
        tmp_path,
        *("--preset", "smoke", "--batch-size", "8", "--policies", "random,mlo"),
        *("--unroll", "1/1/1,2/1/1", "--iterations", "1", "--warmup", "0", "--peak-seconds", "0"),
        *("--threads", "1", "--no-cpu-tuning", "--no-reference"),
    )
    rows = report["results"]
    assert [(row["policy"], row["variant_label"]) for row in rows] == [
        ("random", "pretrain level only"),
        ("mlo", "unroll 1/1/1"),
        ("mlo", "unroll 2/1/1"),
    ]
    assert all(row["status"] == "ok" for row in rows), [row.get("error") for row in rows]
    assert [row["steps_per_iteration"] for row in rows[1:]] == [1, 2]
    for row in rows[1:]:
        assert row["ratio_vs_random"] == pytest.approx(
            row["per_pretrain_step_s"] / rows[0]["per_pretrain_step_s"]
        )
    assert report["hardware"]["torch_threads"] == 1
    assert report["cpu_tuning"] == {"enabled": False, "applies_to_device": True, "applied": []}
    assert "| setting | policy |" in completed.stdout
    assert "CPU tuning: off" in completed.stdout
    assert "Issue 8" not in completed.stdout
    assert markdown(report, rows).count("**Breakdown of one") == 3


# --------------------------------------------------------------------------- named settings, interleaved


def test_named_settings_are_an_axis_that_every_policy_runs_in() -> None:
    args = parse_args(
        [
            *QUICK,
            *("--policies", "random,mlo", "--unroll", "1/1/1", "--setting", "eager", "compile=false"),
            *("--setting", "compiled", "compile=true", "fused_adamw=true"),
        ]
    )
    assert [variant.label for variant in args.variants] == ["eager, unroll 1/1/1", "compiled, unroll 1/1/1"]
    # A named setting may change the pretrain level: the baseline runs in each too.
    assert planned_runs(args) == [("random", 0), ("random", 1), ("mlo", 0), ("mlo", 1)]
    config = make_config(args, "random", args.variants[1])
    assert config.compile and config.fused_adamw and config.pretrain.mae.unroll_steps == 1
    assert not make_config(args, "random", args.variants[0]).compile
    twice = ["--setting", "x", "a=1", "--setting", "x", "a=2"]
    for bad in (["--setting", "a=b"], ["--setting", "name"], twice):
        with pytest.raises(SystemExit):
            parse_args([*QUICK, *bad])


def test_interleaved_settings_keep_their_own_random_streams() -> None:
    from steptime.interleaved import benchmark_interleaved

    args = parse_args(
        [
            *QUICK,
            *("--warmup", "1", "--iterations", "2", "--no-policy-subprocess", "--no-breakdown"),
            *("--setting", "plain", "fused_adamw=false", "--setting", "fused", "fused_adamw=true"),
            *("--setting", "faster", "pretrain.mae.lr=0.002", "--interleave", "--learned-mask-costs"),
        ]
    )
    rows = benchmark_interleaved(args, "mlo-light", [0, 1, 2])
    assert [row["status"] for row in rows] == ["ok"] * 3, [row.get("error") for row in rows]
    plain, fused, faster = rows
    for row in rows:
        assert row["interleaved"] and row["first_iteration_s"] > 0 and len(row["iteration_seconds"]) == 2
        assert len(row["level_losses"]) == 2 and row["flops_per_iteration"] > 0
        assert row["learned_mask_costs"]["parts"]["mask decision (forward)"]["per_iteration_calls"] >= 2
    # Same draws for every setting: the fused update agrees to rounding, another lr does not.
    assert plain["loss_agreement"] == 0.0
    assert fused["loss_agreement"] < 1e-5
    assert faster["loss_agreement"] > 1e-4


def test_the_learned_mask_work_is_amortised_by_the_engine_s_schedule() -> None:
    from steptime.learned_mask_cost import run_schedule

    config = make_config(parse_args(["--preset", "cpu"]), "mlo").pretrain
    # The `cpu` preset on DermaMNIST: 6 epochs over 7007 images at batch 128, unroll 2/1/1.
    schedule = run_schedule(config, 329)
    assert schedule["iterations"] == 164  # mask steps
    assert schedule["refits"] == 32  # every 5 mask steps
    # Every 13 pretrain steps and at the last one, plus step 0; the level-2 balanced accuracy at
    # every other record (steps 0, 26, …, 312) and the last; the SNR probe at every other record
    # after a mask step (12 of them: the even multiples of 13).
    assert schedule["health_records"] == 1 + 25 + 1
    assert schedule["level2_records"] == 13 + 1
    assert schedule["snr_probes"] == 6
    paper = make_config(parse_args(["--preset", "paper"]), "mlo").pretrain
    assert run_schedule(paper, 329)["refits"] == 0


def test_mfu_is_of_the_datasheet_dense_peak() -> None:
    from steptime.peak import datasheet_peak, device_peak

    assert datasheet_peak("NVIDIA H100 80GB HBM3").flops_per_s == pytest.approx(989.5e12)
    assert datasheet_peak("NVIDIA H100 PCIe").flops_per_s == pytest.approx(756.5e12)
    assert datasheet_peak("NVIDIA H200").flops_per_s == pytest.approx(989.5e12)
    assert datasheet_peak("NVIDIA H200 NVL").flops_per_s == pytest.approx(835.5e12)
    assert "datasheet" in datasheet_peak("NVIDIA A100-SXM4-80GB").source
    assert datasheet_peak("Tesla T4") is None
    assert device_peak(CPU, None) is None
    assert device_peak(CPU, 2.5).flops_per_s == 2.5e12
    rows = [{"policy": "random", "status": "ok", "per_pretrain_step_s": 1.0, "achieved_flops_per_s": 4e14}]
    add_derived(rows, None, {"flops_per_s": 8e14, "source": "test"})
    assert rows[0]["mfu"] == pytest.approx(0.5)
