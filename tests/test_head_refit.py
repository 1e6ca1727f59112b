"""The level-2 head's refit: a class-balanced best response on E's features of a fixed subset,
refreshed a rotating share at a time; and the cheaper diagnostics keep what they measure (a
class-capped subset for the balanced accuracy at every other record, the hypergradient probe
inside the mask step at every other chance)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import quiet_context, synthetic_dataset, tiny_config
from sklearn.metrics import balanced_accuracy_score

import maskkit.engine.pretrain as pretrain_module
from maskkit.data import ImageSplit, class_capped_subset
from maskkit.engine.head_refit import ABSENT_CLASS_BIAS, RefitFeatures, refit_head
from maskkit.engine.mask_health import MaskHealth, cosine
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.models import ClassifierHead
from maskkit.plugins import create_policy
from maskkit.policy import policy_context


def _split(count: int, generator: torch.Generator) -> ImageSplit:
    images = torch.randint(0, 256, (count, 3, 8, 8), generator=generator, dtype=torch.uint8)
    return ImageSplit(images=images, labels=torch.arange(count) % 3)


def test_the_refit_features_refresh_a_rotating_window_and_survive_a_round_trip(tmp_path):
    config = tiny_config("mlo-light")
    mae = build_models(config, 3, torch.device("cpu"))[0]
    split = _split(10, torch.Generator().manual_seed(0))
    cache = RefitFeatures(split, refresh=0.3)  # windows of 3 rows
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def autocast() -> contextlib.nullcontext:
        return contextlib.nullcontext()

    first, labels = cache.update(mae, *stats, autocast)
    first = first.clone()
    assert first.shape == (10, config.model.embed_dim) and torch.equal(labels, split.labels)
    with torch.no_grad():  # E moves: only the window's rows follow it
        for parameter in mae.parameters():
            parameter.add_(0.05)
    changed = []
    for _ in range(4):
        before = cache.values.clone()
        after = cache.update(mae, *stats, autocast)[0]
        changed.append(torch.nonzero((after != before).any(1)).flatten().tolist())
    assert changed == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # rows 9, 0, 1: 0 and 1 had moved
    mae.eval()
    with torch.no_grad():
        expected = mae.features(((split.images.float() / 255) - 0.5) / 0.25)
    assert torch.allclose(cache.values, expected, atol=1e-5)
    assert not torch.allclose(cache.values, first, atol=1e-3)
    copy = RefitFeatures(split, refresh=0.3)
    copy.load_state_dict(cache.state_dict())
    assert torch.equal(copy.values, cache.values) and copy.next_row == cache.next_row == 2
    # Features saved for other images (a subset drawn another way) are not taken back.
    other = RefitFeatures(_split(10, torch.Generator().manual_seed(1)), refresh=0.3)
    other.load_state_dict(cache.state_dict())
    assert other.values is None and other.next_row == 0
    assert other.update(mae, *stats, autocast)[0].shape == (10, config.model.embed_dim)  # all rows


def _skewed_features(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[600, 8]`` features whose first three dimensions weakly separate 3 classes, 90 % class 0:
    a plain logistic regression mostly answers class 0 there (balanced accuracy 0.40 at the refit's
    C), a class-balanced one does not (0.71)."""
    labels = torch.cat([torch.zeros(540), torch.ones(30), torch.full((30,), 2.0)]).long()
    features = torch.randn(600, 8, generator=generator)
    features[torch.arange(600), labels] += 1.0
    return features, labels


def test_the_refit_replaces_a_majority_guess_by_the_class_balanced_best_response():
    generator = torch.Generator().manual_seed(0)
    features, labels = _skewed_features(generator)
    head = ClassifierHead(8, 4)  # class 3 never occurs
    with torch.no_grad():  # a head that answers the majority class
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    head(features).sum().backward()
    optimizer.step()
    assert head.linear.weight in optimizer.state

    def balanced_accuracy() -> float:
        with torch.no_grad():
            return balanced_accuracy_score(labels.numpy(), head(features).argmax(1).numpy())

    before = balanced_accuracy()
    refit_head(head, features, labels, optimizer)
    assert before < 0.4 and balanced_accuracy() > 0.65
    assert float(head.linear.bias.detach()[3]) == ABSENT_CLASS_BIAS
    assert head.linear.weight not in optimizer.state and head.linear.bias not in optimizer.state


def test_the_class_capped_subset_keeps_small_classes_whole_and_cuts_the_large():
    labels = torch.cat([torch.zeros(700), torch.ones(20), torch.full((5,), 2.0), torch.full((300,), 3.0)])
    split = ImageSplit(images=torch.zeros(len(labels), 3, 4, 4, dtype=torch.uint8), labels=labels.long())
    subset = class_capped_subset(split, 200, seed=0)
    counts = torch.bincount(subset.labels).tolist()
    assert counts == [87, 20, 5, 87]  # (200 − 25) // 2 each for the large ones
    again = class_capped_subset(split, 200, seed=0)
    assert torch.equal(subset.labels, again.labels)
    assert class_capped_subset(split, 5000, seed=0) is split


def _pretrainer(tmp_path, **learned_mask) -> Pretrainer:
    torch.manual_seed(0)
    config = tiny_config("mlo-light", pretrain={"steps": 6, "learned_mask": learned_mask})
    dataset = synthetic_dataset(num_classes=3, train=64)
    context = quiet_context(config, dataset, tmp_path / "run")
    mae, _, head = build_models(config, len(dataset.class_names), context.device)
    policy = create_policy("mlo-light", policy_context(mae))
    return Pretrainer(context, mae, policy, head)


def test_the_run_refits_the_head_every_n_mask_steps_on_fresh_features(tmp_path, monkeypatch):
    pretrainer = _pretrainer(tmp_path, head_refit_every=2, head_refit_images=18, head_refit_refresh=0.5)
    refits: list[tuple[int, torch.Tensor]] = []
    real_refit = pretrain_module.refit_head

    def recording_refit(head: ClassifierHead, features: torch.Tensor, labels, optimizer) -> None:
        refits.append((pretrainer.mlo.levels["mask"].count, features.clone()))
        real_refit(head, features, labels, optimizer)

    monkeypatch.setattr(pretrain_module, "refit_head", recording_refit)
    finetune = pretrainer.context.splits.finetune
    assert pretrainer.refit_features is not None and len(finetune) > 18
    expected = class_capped_subset(finetune, 18, pretrainer.context.config.seed)
    assert torch.equal(pretrainer.refit_features.split.images, expected.images)  # the small classes kept
    for step in range(1, 7):
        pretrainer.step(step)
    assert [count for count, _ in refits] == [2, 4, 6]
    assert all(features.shape[0] == 18 for _, features in refits)
    # Half the rows are recomputed at each refit after the first, the other half kept.
    moved = [(refits[i + 1][1] != refits[i][1]).any(1) for i in range(2)]
    assert [int(rows.sum()) for rows in moved] == [9, 9]
    assert torch.equal(moved[0], ~moved[1])
    state = pretrainer.training_state(6)
    assert torch.equal(state["refit_features"]["values"], refits[-1][1])


def test_the_snr_probe_compares_a_mask_step_s_hypergradient_with_the_fixed_batch_s_before_t_moves(
    tmp_path,
):
    pretrainer = _pretrainer(tmp_path, head_refit_every=None)
    health = pretrainer.health
    assert isinstance(health, MaskHealth) and health.snr_batch is not None
    policy_parameters = [p for p in pretrainer.policy.parameters() if p.requires_grad]
    seen: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
    real_agreement = health.hypergradient_agreement

    def recording_agreement(step_hypergradient, hypergradient_on):
        at_call = [p.detach().clone() for p in policy_parameters]
        seen.append(([g.clone() for g in step_hypergradient], at_call))
        return real_agreement(step_hypergradient, hypergradient_on)

    health.hypergradient_agreement = recording_agreement
    pretrainer.step(1)
    assert not seen  # no probe asked for
    before = [p.detach().clone() for p in policy_parameters]
    pretrainer.step(2, probe=True)
    assert pretrainer.mask_stepped and len(seen) == 1
    step_hypergradient, at_probe = seen[0]
    # Taken inside the step, before T moved, with the hypergradient the step then applied.
    assert all(torch.equal(a, b) for a, b in zip(at_probe, before, strict=True))
    assert any(not torch.equal(p, b) for p, b in zip(policy_parameters, before, strict=True))
    last = pretrainer.mlo.levels["mask"].last_hypergradient
    assert all(torch.equal(a, b) for a, b in zip(step_hypergradient, last, strict=True))
    # The value is the cosine with the fixed batch's hypergradient at those parameters.
    with torch.no_grad():
        for parameter, value in zip(policy_parameters, before, strict=True):
            parameter.copy_(value)
    fixed = pretrainer.mlo.hypergradient_on(health.snr_batch)
    assert pretrainer.pending_snr == pytest.approx(cosine(step_hypergradient, fixed), abs=1e-6)
    assert -1.0 < pretrainer.pending_snr < 0.999


def test_the_snr_probe_leaves_training_as_it_was(tmp_path):
    def parameters_after(probe: bool, path) -> list[torch.Tensor]:
        pretrainer = _pretrainer(path, head_refit_every=None)
        for step in range(1, 4):
            pretrainer.step(step, probe=probe and step == 2)
        return [p.detach().clone() for p in pretrainer.modules()["mae"].parameters()] + [
            p.detach().clone() for p in pretrainer.policy.parameters()
        ]

    plain, probed = parameters_after(False, tmp_path / "plain"), parameters_after(True, tmp_path / "probed")
    assert all(torch.equal(a, b) for a, b in zip(plain, probed, strict=True))


def test_the_costly_diagnostics_run_at_every_other_chance(tmp_path, monkeypatch):
    pretrainer = _pretrainer(tmp_path, head_refit_every=None)  # 6 steps: a record after each
    records: list[dict] = []
    monkeypatch.setattr(pretrainer.context.run, "log", lambda record: records.append(dict(record)))
    pretrainer.run()
    health = [r for r in records if "mask/logit_abs_max" in r]
    assert [r["step"] for r in health] == list(range(7))
    assert [r["step"] for r in health if "level2/balanced_accuracy" in r] == [0, 2, 4, 6]
    # A mask step follows every pretrain step (unroll 1): the probe at the first chance, the third, …
    assert [r["step"] for r in health if "hypergradient/snr" in r] == [1, 3, 5]
    state = pretrainer.health.state_dict()
    assert state["snr_chances"] == 6
    assert MaskHealth.level2_due(3, last=True) and not MaskHealth.level2_due(3, last=False)


def test_a_checkpoint_restores_the_refit_features(tmp_path):
    pretrainer = _pretrainer(tmp_path, head_refit_every=3, head_refit_images=20, head_refit_refresh=0.25)
    for step in range(1, 4):
        pretrainer.step(step)
    state = pretrainer.training_state(3)
    resumed = _pretrainer(
        tmp_path / "again", head_refit_every=3, head_refit_images=20, head_refit_refresh=0.25
    )
    resumed.load_training_state(state)
    assert resumed.refit_features is not None and pretrainer.refit_features is not None
    assert torch.equal(resumed.refit_features.values, pretrainer.refit_features.values)
    assert resumed.refit_features.next_row == pretrainer.refit_features.next_row
