"""``benchmarks/step_time.py`` runs end to end at the smoke preset and writes sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
POLICIES = ("random", "mlo", "mlo-light", "blockwise", "hpm")


@pytest.mark.slow
def test_step_time_script_reports_every_policy(tmp_path: Path) -> None:
    output = tmp_path / "out.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--preset",
        "smoke",
        "--policies",
        ",".join(POLICIES),
        "--iterations",
        "1",
        "--warmup",
        "0",
        "--peak-seconds",
        "0.1",
        # One process for all policies: each fresh worker would import torch again (seconds).
        "--no-policy-subprocess",
        "--json",
        str(output),
        "--markdown",
    ]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert list(tmp_path.iterdir()) == [output], "the script must write nothing but its --json file"
    assert "| policy |" in completed.stdout

    report = json.loads(output.read_text())
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
