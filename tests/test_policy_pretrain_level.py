"""The contract's pretrain-level extension: ``pretrain_loss``, ``pretrain_parameters`` and
``set_progress``, through the real engine with policies written here as a third party would."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_context, synthetic_dataset, tiny_config
from torch import Tensor, nn

from maskkit.engine.objectives import masked_reconstruction
from maskkit.engine.pretrain import Pretrainer
from maskkit.engine.run import build_models
from maskkit.errors import PluginError
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, decision_from_scores, policy_context

PREDICTED = "predicted error"


class ErrorRegression(MaskPolicy):
    """Random masks; a per-patch linear predictor of the error, trained at the pretrain level
    by mean squared error on the masked patches. Records every ``set_progress`` call."""

    name = "error-regression"
    learnable = False

    def __init__(self, context, constant_loss: float | None = None) -> None:
        super().__init__(context)
        self.predictor = nn.Linear(context.embed_dim, 1)
        nn.init.zeros_(self.predictor.weight)
        self.constant_loss = constant_loss
        self.progress_calls: list[tuple[int, int]] = []

    def forward(self, batch: MaskBatch) -> MaskDecision:
        predicted = self.predictor(batch.tokens.detach()).squeeze(-1)  # [B, L]
        noise = torch.rand(batch.tokens.shape[:2])
        return decision_from_scores(noise, batch.mask_ratio, maps={PREDICTED: predicted})

    def pretrain_parameters(self):
        return self.predictor.parameters()

    def pretrain_loss(self, decision: MaskDecision, batch: MaskBatch, error: Tensor) -> Tensor:
        assert not error.requires_grad and error.dtype == torch.float32
        if self.constant_loss is not None:
            return torch.tensor(self.constant_loss)
        squared = (decision.maps[PREDICTED] - error) ** 2
        return (squared * decision.mask).sum() / decision.mask.sum()

    def set_progress(self, step: int, total_steps: int) -> None:
        self.progress_calls.append((step, total_steps))


class LogitsWithPredictor(ErrorRegression):
    """Learnable: a logit per position at level 3, beside the pretrain-level predictor."""

    name = "logits-with-predictor"
    learnable = True

    def __init__(self, context) -> None:
        super().__init__(context)
        self.logits = nn.Parameter(torch.zeros(context.num_patches))

    def forward(self, batch: MaskBatch) -> MaskDecision:
        decision = super().forward(batch)
        prob = self.logits.sigmoid().expand(batch.tokens.shape[0], -1)  # [B, L]
        return decision_from_scores(prob + 0.1 * torch.rand_like(prob), batch.mask_ratio, prob, decision.maps)


def _pretrainer(tmp_path, policy_class: type[MaskPolicy], steps: int = 6, **options) -> Pretrainer:
    torch.manual_seed(0)
    config = tiny_config("random", pretrain={"steps": steps})
    dataset = synthetic_dataset()
    context = quiet_context(config, dataset, tmp_path / "run")
    mae, _, head = build_models(config, len(dataset.class_names), context.device)
    policy = policy_class(policy_context(mae), **options)
    return Pretrainer(context, mae, policy, head if policy.learnable else None)


def _optimised(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_a_fixed_policy_trains_its_pretrain_parameters_with_the_mae(tmp_path):
    pretrainer = _pretrainer(tmp_path, ErrorRegression)
    policy = pretrainer.policy
    predictor = [p.detach().clone() for p in policy.predictor.parameters()]
    mae_before = [p.detach().clone() for p in pretrainer.mae.parameters()]

    pretrainer.run()

    assert set(pretrainer.mlo.levels) == {"pretrain"}
    assert {id(p) for p in policy.predictor.parameters()} <= _optimised(
        pretrainer.mlo.levels["pretrain"].optimizer
    )
    assert all(not torch.equal(a, b) for a, b in zip(predictor, policy.predictor.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(mae_before, pretrainer.mae.parameters(), strict=True))
    records = [r for r in pretrainer.context.run.read_metrics() if "loss/policy_pretrain" in r]
    assert len(records) == 6  # logged at every step of this 6-step run
    assert all(r["loss/policy_pretrain"] > 0 for r in records)
    assert policy.progress_calls == [(step, 6) for step in range(1, 7)]


def test_the_hook_is_added_once_to_the_pretrain_step_and_kept_out_of_the_hypergradient(tmp_path):
    pretrainer = _pretrainer(tmp_path, ErrorRegression, constant_loss=5.0)
    objectives, batch = pretrainer.objectives, pretrainer.batches["pretrain"].next()
    images = batch.images

    def plain() -> torch.Tensor:
        return masked_reconstruction(
            pretrainer.mae, pretrainer.policy, images, objectives.mask_ratio, pretrainer.weighting
        ).loss

    with torch.random.fork_rng():
        plain_at_start = plain()
    with torch.random.fork_rng():
        step = objectives.pretrain_loss(batch)
        after_step = torch.get_rng_state()
    with torch.random.fork_rng():
        hypergradient = objectives.pretrain_loss(batch, purpose="hypergradient")
    with torch.random.fork_rng():
        # The hypergradient's evaluations draw from where the step left the stream.
        torch.set_rng_state(after_step)
        plain_after_step = plain()
    assert torch.allclose(step, plain_at_start + 5.0)
    assert torch.allclose(hypergradient, plain_after_step)
    assert float(objectives.last_policy_pretrain) == 5.0


def test_a_learnable_policy_splits_its_parameters_between_level_3_and_the_pretrain_level(tmp_path):
    pretrainer = _pretrainer(tmp_path, LogitsWithPredictor, steps=2)
    policy, levels = pretrainer.policy, pretrainer.mlo.levels
    predictor_ids = {id(p) for p in policy.predictor.parameters()}
    assert _optimised(levels["mask"].optimizer) == {id(policy.logits)}
    assert {id(p) for p in levels["mask"].trainable_parameters()} == {id(policy.logits)}
    assert predictor_ids <= _optimised(levels["pretrain"].optimizer)
    assert not predictor_ids & {id(p) for p in levels["pretrain"].trainable_parameters()}  # no hypergradient
    logits, predictor = policy.logits.detach().clone(), policy.predictor.weight.detach().clone()

    pretrainer.run()

    assert pretrainer.mlo.step_counts() == {"pretrain": 2, "finetune": 2, "mask": 2}  # unroll 1/1/1
    assert not torch.equal(logits, policy.logits)  # level 3 moved its logits
    assert not torch.equal(predictor, policy.predictor.weight)  # the pretrain level its predictor


class ForeignParameters(ErrorRegression):
    name = "foreign"

    def pretrain_parameters(self):
        return iter([nn.Parameter(torch.zeros(3))])


def test_pretrain_parameters_must_be_the_policys_own(tmp_path):
    with pytest.raises(PluginError, match=r"'foreign'.*pretrain_parameters\(\)"):
        _pretrainer(tmp_path, ForeignParameters)
