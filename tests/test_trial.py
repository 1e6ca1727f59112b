"""``maskkit trial``: the paired fork test, validated both ways on a tiny model in seconds.

(a) ``random`` against ``random`` is exactly 0 with the same mask seed, and its interval covers
0 with another mask seed; (b) a known-worse policy (one fixed mask on every image, a third-party
policy registered through a fake entry point) is told apart from ``random``, in random's favour.
Then the pieces that make it a fair instrument (shared batches and optimiser state, the interval)
and the user errors (one line, exit code 2).
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from scipy import stats

from maskkit import cli
from maskkit.checkpoint import load_checkpoint
from maskkit.config import build_config
from maskkit.engine import run as runs
from maskkit.engine import trial as trials
from maskkit.engine.trial import ArmSpec, RunSource, TrialSettings
from maskkit.hookspecs import hookimpl
from maskkit.plugins import get_registry
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, PolicyContext, decision_from_scores

IMAGE = 16
PATCH = 4
CLASSES = 7


def write_signal_npz(path: Path, sizes: tuple[int, int, int] = (448, 224, 32), seed: int = 0) -> Path:
    """A MedMNIST-layout file (``dermamnist.npz``) whose images carry their class: class ``k``
    lights the ``k``-th cell of a 3 × 3 grid (with a class tint), over noise."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), sizes, strict=True):
        labels = np.arange(count) % CLASSES
        images = rng.integers(0, 120, (count, 28, 28, 3)).astype(np.float64)
        for index, label in enumerate(labels):
            row, col = divmod(int(label), 3)
            images[index, row * 9 : row * 9 + 9, col * 9 : col * 9 + 9, :] += 100
            images[index, :, :, label % 3] += 20
        arrays[f"{split}_images"] = images.clip(0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.astype(np.uint8).reshape(-1, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these tiny models run several times slower on a shared, busy CPU with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_training(folder: Path, policy: str, pretrain: dict | None = None) -> Path:
    """A tiny run of ``policy`` (16 px, patch 4, width 16, 10 pretrain steps, no fine-tuning) on
    the data under ``folder``, ``pretrain`` merged into its stage-1 settings; returns its run dir."""
    model = {
        "img_size": IMAGE,
        "patch_size": PATCH,
        "embed_dim": 16,
        "depth": 1,
        "num_heads": 2,
        "decoder_embed_dim": 16,
        "decoder_depth": 1,
        "decoder_num_heads": 2,
    }
    config = build_config(
        "smoke",
        overrides=[
            {
                "policy": policy,
                "device": "cpu",
                "model": model,
                "data": {"dataset": "dermamnist", "data_dir": str(folder / "data"), "subset": None},
                "pretrain": {"steps": 10, "mae": {"batch_size": 32}, **(pretrain or {})},
                "finetune": {"epochs": 0},
            }
        ],
    )
    name = f"run-{policy}" + ("-" + "-".join(sorted(pretrain)) if pretrain else "")
    return runs.train(config, folder / name, Console(quiet=True)).path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny random-mask run with a stage-1 checkpoint."""
    folder = tmp_path_factory.mktemp("trial")
    write_signal_npz(folder / "data" / "dermamnist.npz")
    return tiny_training(folder, "random")


def settings(run: Path, a: str = "random", b: str = "random", **changes) -> TrialSettings:
    arm_a = changes.pop("arm_a", ArmSpec(a))
    arm_b = changes.pop("arm_b", ArmSpec(b))
    # The validations below were sized at a constant lr (docs/trial.md, "In the tests").
    base = {"forks": 5, "steps": 50, "lr": 3e-3, "lr_schedule": "constant", "probe_images": 448}
    base |= {"probe_c": 1.0, "seed": 0}
    return TrialSettings(RunSource(run), arm_a, arm_b, **{**base, **changes})


def run(trial_settings: TrialSettings) -> dict:
    return trials.run_trial(trial_settings, Console(quiet=True))


# --- a known-worse third-party policy -------------------------------------------------------------


class FixedMask(MaskPolicy):
    """Masks one fixed set of patches on every image: the same ``L − K`` patches always, those of
    the top-left of the grid (where most classes' cells lie)."""

    name = "fixed-mask"
    description = "one fixed mask for every image (a known-worse policy for the trial's test)"

    def __init__(self, context: PolicyContext, offset: int = 0) -> None:
        super().__init__(context)
        self.offset = int(offset)

    def forward(self, batch: MaskBatch) -> MaskDecision:
        b, length = batch.tokens.shape[:2]
        scores = -torch.arange(length, dtype=torch.float32).roll(self.offset)  # patch 0 masked first
        return decision_from_scores(scores.expand(b, length).to(batch.tokens.device), batch.mask_ratio)


class FakeDistribution:
    name = "maskkit-test-fixed"


class FakeEntryPoint:
    """What ``get_registry`` uses of an entry point: a name, a distribution and ``load``."""

    name, group, value, dist = "fixed-mask", "maskkit", "fake_fixed_mask", FakeDistribution()

    def load(self) -> types.ModuleType:
        module = types.ModuleType("fake_fixed_mask")

        @hookimpl
        def maskkit_policies() -> list:
            return [FixedMask]

        module.maskkit_policies = maskkit_policies  # type: ignore[attr-defined]
        return module


@pytest.fixture
def fixed_mask_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fixed-mask`` installed beside maskkit's own policies (the isolated view of conftest)."""
    isolated = importlib.metadata.entry_points

    def entry_points(**selection):
        found = isolated(**selection)
        return [*found, FakeEntryPoint()] if selection.get("group") == "maskkit" else found

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    get_registry.cache_clear()
    yield
    get_registry.cache_clear()


# --- the two validations --------------------------------------------------------------------------


def test_random_against_itself_is_exactly_zero(tiny_run):
    result = run(settings(tiny_run, forks=2, steps=3))
    for summary in result["metrics"].values():
        assert summary["per_fork"] == [0.0, 0.0] and summary["ci95"] == [0.0, 0.0]
    cross_entropy = result["metrics"]["val_cross_entropy"]["a"]
    assert cross_entropy[0] != cross_entropy[1]  # the forks themselves differ


def test_random_against_random_with_another_mask_seed_covers_zero(tiny_run):
    result = run(settings(tiny_run, arm_b=ArmSpec("random", mask_seed=1)))
    for summary in result["metrics"].values():
        low, high = summary["ci95"]
        assert low < 0 < high, summary
        assert any(value != 0 for value in summary["per_fork"])  # the masks did differ


def test_a_fixed_mask_is_told_apart_from_random(tiny_run, fixed_mask_installed):
    result = run(settings(tiny_run, "fixed-mask", "random"))
    cross_entropy = result["metrics"]["val_cross_entropy"]
    balanced = result["metrics"]["balanced_accuracy"]
    assert cross_entropy["ci95"][0] > 0, cross_entropy  # fixed has the higher val CE
    assert balanced["ci95"][1] < 0, balanced  # and the lower balanced accuracy
    assert result["settings"]["A"]["policy"] == "fixed-mask"


# --- what makes it fair ---------------------------------------------------------------------------


def test_both_arms_see_the_same_batches_and_the_forks_differ(tiny_run, monkeypatch):
    seen: list[tuple[int, torch.Tensor]] = []
    original = trials.DeviceBatches.next

    def recording(self):
        batch = original(self)
        seen.append((self.seed, batch.images.clone()))
        return batch

    monkeypatch.setattr(trials.DeviceBatches, "next", recording)
    run(settings(tiny_run, arm_b=ArmSpec("random", mask_seed=1), forks=2, steps=2))
    assert len(seen) == 8  # 2 forks × 2 arms × 2 steps, A's then B's in each fork
    for fork in range(2):
        a, b = seen[4 * fork : 4 * fork + 2], seen[4 * fork + 2 : 4 * fork + 4]
        assert all(torch.equal(x[1], y[1]) and x[0] == y[0] for x, y in zip(a, b, strict=True))
    assert not torch.equal(seen[0][1], seen[4][1])


def test_every_arm_starts_from_the_checkpoint_optimiser_state(tiny_run):
    setup = trials.open_trial(settings(tiny_run), Console(quiet=True))
    mae = trials.train_arm(setup, setup.arms["A"], 0, settings(tiny_run, steps=1))
    assert any(not torch.equal(p, setup.mae_state[k]) for k, p in mae.state_dict().items())
    optimizer = trials.arm_optimizer(setup, mae)  # after an arm ran: still the checkpoint's state
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {10}  # the run's 10 pretrain steps
    assert {group["lr"] for group in optimizer.param_groups} == {3e-3}


def test_a_decaying_schedule_steps_each_arm_at_lr_times_one_minus_k_over_k(tiny_run, monkeypatch):
    used: list[float] = []
    original = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    setup = trials.open_trial(settings(tiny_run), Console(quiet=True))
    trials.train_arm(setup, setup.arms["A"], 0, settings(tiny_run, steps=4, lr_schedule="decay"))
    assert used == pytest.approx([3e-3, 2.25e-3, 1.5e-3, 0.75e-3])
    used.clear()
    trials.train_arm(setup, setup.arms["A"], 0, settings(tiny_run, steps=2, lr_schedule="constant"))
    assert used == pytest.approx([3e-3, 3e-3])
    assert trials.TrialSettings.__dataclass_fields__["lr_schedule"].default == "decay"


def test_a_trained_policy_state_comes_from_its_run(tiny_run):
    """hpm's loss predictor trains with the MAE: its state is in the run's checkpoint, and its
    own optimiser groups follow the MAE's (the trial keeps the MAE's moments only)."""
    hpm_run = tiny_training(tiny_run.parent, "hpm")
    saved = load_file(hpm_run / "checkpoints" / "step-000000010" / "policy.safetensors")
    for source, state_from in ((hpm_run, None), (tiny_run, RunSource(hpm_run, "pretrained"))):
        setup = trials.open_trial(
            settings(source, arm_a=ArmSpec("hpm", state_from=state_from)), Console(quiet=True)
        )
        arm = setup.arms["A"]
        assert arm.state_source.endswith(":last" if state_from is None else ":pretrained")
        assert saved.keys() == arm.state.keys()
        assert all(torch.equal(saved[key], arm.state[key]) for key in saved)
        assert not any(p.requires_grad for p in arm.policy.parameters())  # frozen
        assert setup.arms["B"].state_source.startswith("none")  # random holds no state
        groups = load_checkpoint(source / "checkpoints").state["optimizers"]["pretrain"]["param_groups"]
        kept = setup.optimizer_state["param_groups"]
        assert len(kept) == 2 and len(groups) == (2 if source == tiny_run else 4)  # + hpm's groups
    before = {key: value.clone() for key, value in arm.policy.state_dict().items()}
    trials.train_arm(setup, arm, 0, settings(tiny_run, steps=2))
    assert all(torch.equal(before[k], v) for k, v in arm.policy.state_dict().items())


def test_a_learned_policy_is_rebuilt_as_its_run_built_it(tiny_run):
    """The arm's ``mlo`` takes the learned-mask settings of the run that trained it, not today's
    defaults: a run without centred tokens gives a network without them, and its state fits."""
    uncentred = {"learned_mask": {"centre_tokens": False}}
    learned_run = tiny_training(tiny_run.parent, "mlo", uncentred)
    setup = trials.open_trial(settings(learned_run, "mlo", forks=2, steps=1), Console(quiet=True))
    arm = setup.arms["A"]
    assert arm.state_source.endswith(":last") and arm.state
    assert not any(key.startswith("centring.") for key in arm.state)
    assert all(torch.equal(arm.policy.state_dict()[key], value) for key, value in arm.state.items())


def test_the_inverse_arm_masks_what_the_policy_keeps(tiny_run):
    """``--against-inverse``: B is A's own trained policy with its logits negated, so at ratio
    0.5 its mode (the eval-mode top-k) masks exactly the patches A's keeps."""
    learned_run = tiny_training(tiny_run.parent, "mlo-light")
    arm_b = ArmSpec("mlo-light", inverse=True)
    setup = trials.open_trial(
        settings(learned_run, "mlo-light", arm_b=arm_b, forks=2, steps=1), Console(quiet=True)
    )
    policy_a, policy_b = setup.arms["A"].policy, setup.arms["B"].policy
    assert (policy_a.inverted, policy_b.inverted) == (False, True)
    assert setup.arms["B"].state_source.endswith(":last")  # the run's trained T, not a fresh one
    assert all(torch.equal(setup.arms["A"].state[k], v) for k, v in setup.arms["B"].state.items())
    tokens = torch.randn(6, (IMAGE // PATCH) ** 2, 16)
    batch = MaskBatch(tokens=tokens, images=torch.zeros(6, 3, IMAGE, IMAGE), mask_ratio=0.5)
    policy_a.eval(), policy_b.eval()
    mask_a, mask_b = policy_a(batch).mask, policy_b(batch).mask
    assert mask_a.sum(1).eq(8).all() and torch.equal(mask_a + mask_b, torch.ones_like(mask_a))
    assert torch.allclose(policy_b.logits(batch), -policy_a.logits(batch))


def test_the_inverse_of_a_policy_without_logits_is_refused(tiny_run, capsys, monkeypatch):
    code, _, err = run_cli(
        ["trial", "--from", tiny_run, "--policy", "random", "--inverse"], capsys, monkeypatch
    )
    assert code == 2 and "Traceback" not in err
    assert "--inverse: policy 'random' has no logits to negate" in " ".join(err.split())


def test_the_interval_is_student_t_over_the_forks():
    a, b = [0.5, 0.9, 0.4, 0.8], [0.3, 0.4, 0.35, 0.2]
    summary = trials.paired_summary(a, b)
    d = np.subtract(a, b)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    assert summary["per_fork"] == pytest.approx(list(d))
    assert summary["mean"] == pytest.approx(d.mean())
    assert summary["ci95"] == pytest.approx([d.mean() - half, d.mean() + half])


def test_source_parsing():
    assert RunSource.parse("runs/x") == RunSource(Path("runs/x"), "last")
    assert RunSource.parse("runs/x:pretrained") == RunSource(Path("runs/x"), "pretrained")
    assert RunSource.parse("/a/b:best") == RunSource(Path("/a/b"), "best")


# --- the command line ------------------------------------------------------------------------------


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["maskkit", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out, captured.err


def test_cli_prints_the_table_and_writes_the_json(tiny_run, tmp_path, capsys, monkeypatch):
    path = tmp_path / "trial.json"
    args = ["trial", "--from", f"{tiny_run}:pretrained", "--policy", "random", "--against-mask-seed", "3"]
    args += ["--forks", "2", "--steps", "2", "--probe-images", "64", "--json", path]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "val balanced accuracy" in out and "95 % interval" in out
    saved = json.loads(path.read_text())
    assert saved["settings"]["pointer"] == "pretrained" and saved["settings"]["B"]["mask_seed"] == 3
    assert saved["settings"]["probe"]["C"] in trials.LINEAR_PROBE_C  # chosen on the start encoder
    assert set(saved["metrics"]) == {"val_cross_entropy", "balanced_accuracy"}
    assert len(saved["metrics"]["balanced_accuracy"]["per_fork"]) == 2
    assert saved["cost"]["pretrain_steps"] == 2 * 2 * 2


@pytest.mark.parametrize(
    ("arguments", "fragments"),
    [
        (["--from", "{missing}", "--policy", "random"], ["not a maskkit run directory"]),
        (["--from", "{run}", "--policy", "nosuch"], ["unknown policy 'nosuch'", "random"]),
        (["--from", "{run}:nosuch", "--policy", "random"], ["no 'nosuch' checkpoint", "pretrained"]),
        (["--from", "{run}", "--policy", "random", "--forks", "1"], ["at least 2 forks"]),
        (["--from", "{run}", "--policy", "random", "--lr-schedule", "cosine"], ["--lr-schedule", "decay"]),
        (["--from", "{run}", "--policy", "random", "--mask-ratio", "0.99"], ["keeps no token"]),
        (["--from", "{run}", "--policy", "random", "--policy-from", "{missing}"], ["not a maskkit run"]),
    ],
)
def test_user_errors_end_in_one_line(tiny_run, tmp_path, capsys, monkeypatch, arguments, fragments):
    args = [a.format(run=tiny_run, missing=tmp_path / "nothing") for a in arguments]
    code, _, err = run_cli(["trial", *args], capsys, monkeypatch)
    message = " ".join(err.split())
    assert code == 2, err
    assert "Traceback" not in err and message.startswith("error:"), err
    assert len([line for line in err.splitlines() if line.strip()]) <= 3  # one line, wrapped by rich
    for fragment in fragments:
        assert fragment in message, message
