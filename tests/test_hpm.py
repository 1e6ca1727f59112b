"""``hpm``: Hard Patches Mining. Its relative loss, its predictor learning the real per-patch
error in the real pretrain loop, the easy-to-hard schedule, exact resume, and the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from cli_helpers import maskkit
from helpers import quiet_context, tiny_config, write_medmnist_npz
from PIL import Image
from rich.console import Console

from maskkit.checkpoint import load_checkpoint
from maskkit.data import ImageSplit, LabelledDataset, make_splits, normalize
from maskkit.engine.context import RunContext
from maskkit.engine.objectives import masked_reconstruction
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.errors import PluginError
from maskkit.plugins import create_policy
from maskkit.policy import MaskBatch, PolicyContext, validate_decision
from maskkit.rundir import RunDir
from maskkit_plugins.hpm import PREDICTED_LOSS, HardPatchesMining, easy_to_hard_share, relative_loss

# --- the relative loss --------------------------------------------------------------------------


def test_relative_loss_is_the_mean_pairwise_cross_entropy_over_ordered_pairs():
    generator = torch.Generator().manual_seed(0)
    predicted = torch.randn(2, 5, generator=generator, dtype=torch.float64)
    error = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.9], [0.3, 0.3, 0.3, 0.3, 0.8]], dtype=torch.float64)
    terms = []
    for b, i, j in itertools.product(range(2), range(5), range(5)):
        if error[b, i] == error[b, j]:
            continue  # ties carry no order
        probability = torch.sigmoid(predicted[b, j] - predicted[b, i])  # "j is harder than i"
        terms.append(-torch.log(probability if error[b, j] > error[b, i] else 1 - probability))
    assert torch.allclose(relative_loss(predicted, error), torch.stack(terms).mean())


def test_relative_loss_rewards_the_order_not_the_values():
    error = torch.tensor([[0.2, 0.4, 0.6, 0.8]])
    assert float(relative_loss(torch.zeros(1, 4), error)) == pytest.approx(math.log(2))
    right = relative_loss(10 * error + 5, error)  # any monotone map of the error is right
    wrong = relative_loss(-10 * error, error)
    assert float(right) < 0.15 < math.log(2) < float(wrong)


# --- the predictor learns the real error, in the real pretrain loop ----------------------------

GRID, PATCH = 4, 4


def ramps_and_noise(count: int, seed: int) -> tuple[ImageSplit, torch.Tensor]:
    """Images of 4×4 patches, each at random either a brightness ramp (the same pattern after
    norm-pix normalisation, so an MAE learns to predict it) or uniform noise (which it cannot).

    Returns the split and ``[N, L]`` True where a patch is a ramp.
    """
    generator = torch.Generator().manual_seed(seed)
    ramp_patches = torch.rand(count, GRID, GRID, generator=generator) < 0.5
    base = 60 + 100 * torch.rand(count, GRID, GRID, 1, 1, generator=generator)
    slope = 40 + 60 * torch.rand(count, GRID, GRID, 1, 1, generator=generator)
    ramps = base + slope * torch.linspace(0, 1, PATCH).expand(PATCH, PATCH)
    noise = 255 * torch.rand(count, GRID, GRID, PATCH, PATCH, generator=generator)
    cells = torch.where(ramp_patches[..., None, None], ramps, noise)  # [N, g, g, p, p]
    side = GRID * PATCH
    images = cells.permute(0, 1, 3, 2, 4).reshape(count, 1, side, side).expand(-1, 3, -1, -1)
    pixels = images.round().clamp(0, 255).to(torch.uint8).contiguous()
    return ImageSplit(pixels, torch.zeros(count, dtype=torch.int64)), ramp_patches.flatten(1)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's correlation of two flat tensors."""
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


HPM_MODEL = {
    "img_size": GRID * PATCH,
    "patch_size": PATCH,
    "embed_dim": 32,
    "depth": 1,
    "num_heads": 2,
    "decoder_embed_dim": 32,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
}


def hpm_pretrainer(tmp_path, steps: int, name: str = "run", reopen: bool = False) -> Pretrainer:
    """A fresh hpm Pretrainer on ramps and noise; ``reopen`` uses the existing run dir ``name``."""
    train, _ = ramps_and_noise(256, seed=0)
    held_out, _ = ramps_and_noise(64, seed=1)
    dataset = LabelledDataset("ramps", train, held_out, held_out, ["ramps"], (0.5,) * 3, (0.25,) * 3)
    config = tiny_config(
        "hpm",
        mask_ratio=0.75,
        model=HPM_MODEL,
        pretrain={"steps": steps, "checkpoint_every": 3, "mae": {"batch_size": 32, "lr": 3e-3}},
    )
    if reopen:
        splits = make_splits(dataset, config.data.train_portion, config.data.mask_source)
        run = RunDir(tmp_path / name)  # the run dir as the interrupted run left it
        context = RunContext(config, torch.device("cpu"), dataset, splits, run, Console(quiet=True))
    else:
        context = quiet_context(config, dataset, tmp_path / name)
    mae, policy, _ = build_models(config, 1, context.device)
    return Pretrainer(context, mae, policy, None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Pretrainer:
    pretrainer = hpm_pretrainer(tmp_path_factory.mktemp("hpm"), steps=100)
    pretrainer.run()
    return pretrainer


def test_the_ranking_loss_falls_in_the_pretrain_loop(trained):
    losses = [
        r["loss/policy_pretrain"] for r in trained.context.run.read_metrics() if "loss/policy_pretrain" in r
    ]
    assert len(losses) == 100
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the zero-initialised head knows nothing
    assert sum(losses[-10:]) / 10 < 0.45


def test_the_predictions_correlate_with_the_true_per_patch_error_on_held_out_images(trained):
    held_out, ramp_patches = ramps_and_noise(64, seed=2)
    images = normalize(held_out.images, (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        result = masked_reconstruction(trained.mae, trained.policy, images, 0.75, trained.weighting)
    predicted, masked = result.decision.maps[PREDICTED_LOSS], result.decision.mask.bool()
    assert rank_correlation(predicted[masked], result.error[masked]) > 0.6
    # What it has learnt is the real difficulty: the noise patches are the hard ones.
    assert result.error[~ramp_patches].mean() > 1.5 * result.error[ramp_patches].mean()
    assert predicted[~ramp_patches].mean() > predicted[ramp_patches].mean()


def test_the_predictor_trains_at_the_pretrain_level_and_the_schedule_ends_where_it_should(trained):
    policy, level = trained.policy, trained.mlo.levels["pretrain"]
    assert set(trained.mlo.levels) == {"pretrain"}
    optimised = {id(p) for group in level.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in policy.predictor.parameters()} <= optimised
    assert policy.progress.tolist() == [100, 100] and policy.hard_share() == 0.5
    saved = load_checkpoint(trained.context.run.checkpoints, "pretrained").weights["policy"]
    assert saved["progress"].tolist() == [100, 100]  # maskkit visualize sees the final schedule


# --- the easy-to-hard schedule ------------------------------------------------------------------

CONTEXT = PolicyContext(num_patches=16, embed_dim=8, grid_size=4, patch_size=4)


def test_the_hard_share_grows_linearly_from_start_to_end():
    assert [easy_to_hard_share(p, 0.0, 0.5) for p in (0.0, 0.25, 1.0, 1.5, -1.0)] == [
        0.0,
        0.125,
        0.5,
        0.5,
        0.0,
    ]
    policy = create_policy("hpm", CONTEXT, {"hard_share_start": 0.2, "hard_share_end": 0.6})
    assert policy.hard_share() == pytest.approx(0.2)  # before training
    for step, share in ((1, 0.204), (50, 0.4), (100, 0.6)):
        policy.set_progress(step, 100)
        assert policy.hard_share() == pytest.approx(share)


@pytest.mark.parametrize(("step", "hard"), [(0, 0), (40, 2), (100, 6)])
def test_the_predicted_hardest_patches_are_masked_and_the_rest_is_random(step, hard):
    torch.manual_seed(0)
    policy = create_policy("hpm", CONTEXT, {"hard_share_end": 0.5})
    predicted = torch.arange(16.0).flip(0)  # patch 0 predicted hardest, patch 15 easiest
    policy.predictor.forward = lambda tokens: predicted.expand(tokens.shape[0], -1)
    policy.set_progress(step, 100)
    batch = MaskBatch(images=torch.zeros(4000, 3, 16, 16), tokens=torch.zeros(4000, 16, 8), mask_ratio=0.75)
    decision = policy(batch)
    validate_decision(decision, batch, "hpm")
    assert int(12 * policy.hard_share()) == hard  # of the 12 masked patches
    rate = decision.mask.mean(dim=0)  # [L], how often each patch is masked
    assert bool((rate[:hard] == 1).all())  # the hardest are always masked
    expected = (12 - hard) / (16 - hard)  # the others share the rest uniformly
    assert torch.allclose(rate[hard:], torch.full((16 - hard,), expected), atol=0.03)
    assert torch.equal(decision.maps[PREDICTED_LOSS], predicted.expand(4000, -1))


# --- resume, options and the command line --------------------------------------------------------


def test_an_interrupted_hpm_run_resumes_bit_for_bit(tmp_path):
    straight = hpm_pretrainer(tmp_path, steps=6, name="straight")
    straight.run()
    first = hpm_pretrainer(tmp_path, steps=6, name="interrupted")
    for step in range(1, 4):
        first.step(step)
    first.save(3, ("last",))
    resumed = hpm_pretrainer(tmp_path, steps=6, name="interrupted", reopen=True)  # fresh models
    resumed.resume_from(load_checkpoint(resumed.context.run.checkpoints, "last"))
    resumed.run()
    for name in ("mae", "policy"):
        expected, got = straight.modules()[name].state_dict(), resumed.modules()[name].state_dict()
        assert all(torch.equal(expected[key], got[key]) for key in expected), name
    assert resumed.policy.progress.tolist() == [6, 6]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"hard_share_end": 1.5}, "hard_share_end must be a number in [0, 1]"),
        ({"hard_share_start": -0.1}, "hard_share_start must be a number in [0, 1]"),
        ({"depth": -1}, "depth must be an integer >= 0"),
        ({"width": 30, "num_heads": 4}, "width 30 is not divisible by num_heads 4"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, fragment):
    with pytest.raises(PluginError) as caught:
        create_policy("hpm", CONTEXT, options)
    assert fragment in str(caught.value) and "'hpm'" in str(caught.value)


def test_the_predictor_is_small_and_is_the_policys_only_parameters():
    policy = create_policy("hpm", PolicyContext(num_patches=64, embed_dim=128, grid_size=8, patch_size=4))
    assert isinstance(policy, HardPatchesMining) and not policy.learnable
    count = sum(p.numel() for p in policy.parameters())
    assert count == sum(p.numel() for p in policy.pretrain_parameters())
    assert count < 100_000  # one block of width 64 at the cpu preset; the MAE has 1.2 M


@pytest.mark.slow
def test_train_and_visualize_hpm_from_the_command_line(tmp_path):
    write_medmnist_npz(tmp_path / "data" / "dermamnist.npz")
    run_dir = tmp_path / "run"
    result = maskkit(
        "train", "--policy", "hpm", "--dataset", "dermamnist", "--data-dir", tmp_path / "data",
        "--preset", "smoke", "--run-dir", run_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert "its own parameters trained with the MAE" in " ".join(result.stdout.split())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/policy_pretrain" in record for record in records)
    output = tmp_path / "grid.png"
    result = maskkit("visualize", run_dir, "--num-images", "2", "--output", output)
    assert result.returncode == 0, result.stderr
    with Image.open(output) as image:
        assert image.size[0] > 1.6 * image.size[1]  # four columns (predicted loss) of two rows
