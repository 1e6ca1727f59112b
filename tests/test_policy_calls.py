"""A policy's own code that raises, wherever the engine calls it, ends in one line naming it."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import TINY_MODEL

from maskkit.config import ModelConfig
from maskkit.data import Batch
from maskkit.engine.objectives import MLOObjectives, masked_reconstruction
from maskkit.engine.policy_calls import (
    PolicyRaisedError,
    checked_regularizer,
    checked_set_progress,
    checked_statistics,
    plugin_code,
)
from maskkit.engine.pretrain import policy_pretrain_parameters
from maskkit.errors import ConfigError, PluginError
from maskkit.models import ClassifierHead, MaskedAutoencoderViT
from maskkit.policy import (
    MalformedDecisionError,
    MaskBatch,
    MaskDecision,
    MaskPolicy,
    decision_from_scores,
    policy_context,
)
from maskkit.weighting import loss_weighting


class ShapeBug(MaskPolicy):
    """Adds a [B, L-1] and a [B, L] tensor in forward: torch raises a RuntimeError."""

    name = "shape-bug"
    learnable = True

    def __init__(self, context) -> None:
        super().__init__(context)
        self.bias = torch.nn.Parameter(torch.zeros(context.num_patches))

    def forward(self, batch: MaskBatch) -> MaskDecision:
        scores = torch.rand(batch.tokens.shape[:2]) + self.bias
        return decision_from_scores(scores[:, :-1] + scores, batch.mask_ratio)  # the bug


class ShapeBugWithPenalty(ShapeBug):
    """The same bug; with a regulariser, level 3 calls forward too."""

    name = "shape-bug"

    def regularizer(self, decision: MaskDecision, batch: MaskBatch) -> None:
        return None


class RegularizerBug(MaskPolicy):
    """A sound forward; its regulariser reads a prior nobody supplies (a KeyError)."""

    name = "regularizer-bug"
    learnable = True

    def __init__(self, context) -> None:
        super().__init__(context)
        self.bias = torch.nn.Parameter(torch.zeros(context.num_patches))

    def forward(self, batch: MaskBatch) -> MaskDecision:
        prob = (torch.rand(batch.tokens.shape[:2]) + self.bias).sigmoid()
        return decision_from_scores(prob, batch.mask_ratio, weights=prob)

    def regularizer(self, decision: MaskDecision, batch: MaskBatch) -> torch.Tensor:
        return batch.priors["heatmap"].mean()


class VectorRegularizer(RegularizerBug):
    name = "vector-regularizer"

    def regularizer(self, decision: MaskDecision, batch: MaskBatch) -> torch.Tensor:
        return decision.weights.mean(dim=1)  # [B]: forgot to reduce


class UserErrorInside(RegularizerBug):
    name = "user-error-inside"

    def forward(self, batch: MaskBatch) -> MaskDecision:
        raise ConfigError("a maskkit error raised in a policy is already a user error")


class PretrainLossBug(MaskPolicy):
    """A fixed policy with a pretrain-level term that reads a map its forward never made."""

    name = "pretrain-loss-bug"

    def __init__(self, context) -> None:
        super().__init__(context)
        self.predictor = torch.nn.Linear(context.embed_dim, 1)

    def pretrain_parameters(self):
        return self.predictor.parameters()

    def forward(self, batch: MaskBatch) -> MaskDecision:
        return decision_from_scores(torch.rand(batch.tokens.shape[:2]), batch.mask_ratio)

    def pretrain_loss(self, decision: MaskDecision, batch: MaskBatch, error: torch.Tensor) -> torch.Tensor:
        return (decision.maps["predicted loss"] - error).pow(2).mean()


class VectorPretrainLoss(PretrainLossBug):
    name = "vector-pretrain-loss"

    def pretrain_loss(self, decision: MaskDecision, batch: MaskBatch, error: torch.Tensor) -> torch.Tensor:
        return error.mean(dim=1)  # [B]: forgot to reduce


class HookBugs(RegularizerBug):
    """A sound forward; set_progress, statistics and pretrain_parameters each break."""

    name = "hook-bugs"

    def set_progress(self, step: int, total_steps: int) -> None:
        self.fraction = step / (total_steps - total_steps)  # ZeroDivisionError

    def statistics(self) -> dict[str, float]:
        return {"beta": self.missing}  # AttributeError

    def pretrain_parameters(self):
        raise NotImplementedError("not yet")


class VectorStatistics(RegularizerBug):
    name = "vector-statistics"

    def statistics(self) -> dict[str, float]:
        return {"ratios": torch.ones(3)}


def _objectives(policy_class: type[MaskPolicy], weighting: str = "straight-through") -> MLOObjectives:
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(ModelConfig(**TINY_MODEL))
    policy = policy_class(policy_context(mae))
    return MLOObjectives(
        mae=mae,
        policy=policy,
        head=ClassifierHead(mae.config.embed_dim, 3, 0.0),
        mask_ratio=0.5,
        autocast=contextlib.nullcontext,
        weighting=loss_weighting(weighting),
    )


IMAGES = torch.randn(4, 3, 8, 8)
LABELS = torch.tensor([0, 1, 2, 0])
BATCH = Batch(IMAGES, LABELS)


def _assert_one_line_naming(error: PolicyRaisedError, policy: str, method: str, raised: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert f"mask policy '{policy}'" in message
    assert f"raised in its {method} at tests/test_policy_calls.py:" in message  # the plugin's line
    assert raised in message
    assert "MASKKIT_DEBUG=1" in message
    assert isinstance(error, PluginError)  # so the CLI prints it as one line, exit 2
    assert error.__cause__ is not None  # the traceback is kept for MASKKIT_DEBUG


@pytest.mark.parametrize(
    "call",
    [
        "pretrain_step",
        "pretrain_pair",
        "pretrain_loss_at (reference weighting)",
        "mask_loss",
        "masked_reconstruction (visualize, diagnostics)",
    ],
)
def test_an_exception_in_forward_is_one_line_wherever_the_engine_calls_it(call: str) -> None:
    weighting = "reference" if "reference" in call else "straight-through"
    objectives = _objectives(ShapeBug, weighting)
    if call == "mask_loss":  # forward is called there for the regulariser only
        objectives = _objectives(ShapeBugWithPenalty)
    actions = {
        "pretrain_step": lambda: objectives.pretrain_loss(BATCH),
        "pretrain_pair": lambda: objectives.pretrain_pair(BATCH),
        "mask_loss": lambda: objectives.mask_loss(BATCH),
        "masked_reconstruction (visualize, diagnostics)": lambda: masked_reconstruction(
            objectives.mae, objectives.policy, IMAGES, 0.5, objectives.weighting
        ),
    }
    if call.startswith("pretrain_loss_at"):
        pair = _objectives(RegularizerBug, "reference").pretrain_pair(BATCH)
        params = {name: value.detach() for name, value in objectives.mae.named_parameters()}
        actions[call] = lambda: objectives.pretrain_loss_at(pair, params)
    with pytest.raises(PolicyRaisedError) as caught:
        actions[call]()
    _assert_one_line_naming(caught.value, "shape-bug", "forward", "RuntimeError: The size of tensor a")


def test_an_exception_in_the_regularizer_is_one_line() -> None:
    objectives = _objectives(RegularizerBug)
    with pytest.raises(PolicyRaisedError) as caught:
        objectives.mask_loss(BATCH)
    _assert_one_line_naming(caught.value, "regularizer-bug", "regularizer", "KeyError: 'heatmap'")


def test_a_regularizer_that_is_not_a_scalar_is_refused_with_the_fix() -> None:
    objectives = _objectives(VectorRegularizer)
    with pytest.raises(PluginError, match=r"returned a regularizer of \[4\]; return a scalar tensor"):
        objectives.mask_loss(BATCH)


def test_a_policy_outside_the_registry_is_named_by_its_module() -> None:
    with pytest.raises(PolicyRaisedError, match=r"'shape-bug' \(module test_policy_calls\)"):
        _objectives(ShapeBug).pretrain_loss(BATCH)


def test_maskkit_errors_and_malformed_decisions_pass_through_unchanged() -> None:
    with pytest.raises(ConfigError, match="already a user error"):
        _objectives(UserErrorInside).pretrain_loss(BATCH)
    policy = _objectives(RegularizerBug).policy
    with pytest.raises(MalformedDecisionError), plugin_code(policy, "forward"):
        raise MalformedDecisionError("stays as it is")


def test_a_long_multi_line_message_is_cut_to_one_line() -> None:
    policy = _objectives(RegularizerBug).policy
    with pytest.raises(PolicyRaisedError) as caught, plugin_code(policy, "forward"):
        raise ValueError("first line\nsecond line " + "x" * 1000)
    message = str(caught.value)
    assert "\n" not in message and "first line second line" in message and len(message) < 700


def test_a_sound_regularizer_passes() -> None:
    objectives = _objectives(RegularizerBug)
    batch = MaskBatch(
        images=IMAGES, tokens=torch.randn(4, 4, 8), mask_ratio=0.5, priors={"heatmap": torch.ones(4, 4)}
    )
    decision = objectives.policy(batch)
    assert float(checked_regularizer(objectives.policy, decision, batch)) == 1.0


def test_an_exception_in_the_pretrain_loss_hook_is_one_line() -> None:
    objectives = _objectives(PretrainLossBug)
    with pytest.raises(PolicyRaisedError) as caught:
        objectives.pretrain_loss(BATCH)
    _assert_one_line_naming(caught.value, "pretrain-loss-bug", "pretrain_loss", "KeyError: 'predicted loss'")


def test_a_pretrain_loss_that_is_not_a_scalar_is_refused_with_the_fix() -> None:
    objectives = _objectives(VectorPretrainLoss)
    with pytest.raises(PluginError, match=r"returned a pretrain_loss of \[4\]; return a scalar tensor"):
        objectives.pretrain_loss(BATCH)


@pytest.mark.parametrize(
    ("method", "raised"),
    [
        ("set_progress", "ZeroDivisionError"),
        ("statistics", "AttributeError"),
        ("pretrain_parameters", "NotImplementedError: not yet"),
    ],
)
def test_an_exception_in_a_pretrain_level_hook_is_one_line(method: str, raised: str) -> None:
    policy = _objectives(HookBugs).policy
    calls = {
        "set_progress": lambda: checked_set_progress(policy, 1, 10),
        "statistics": lambda: checked_statistics(policy),
        "pretrain_parameters": lambda: policy_pretrain_parameters(policy),
    }
    with pytest.raises(PolicyRaisedError) as caught:
        calls[method]()
    _assert_one_line_naming(caught.value, "hook-bugs", method, raised)


def test_statistics_must_be_numbers() -> None:
    assert checked_statistics(_objectives(RegularizerBug).policy) == {}
    with pytest.raises(PluginError, match=r"statistics\['ratios'\] of type Tensor of shape \[3\]"):
        checked_statistics(_objectives(VectorStatistics).policy)
