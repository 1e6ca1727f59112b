"""Comparisons between policies start from the same place and never select on test."""

from __future__ import annotations

import pytest
import torch
from helpers import write_medmnist_npz
from rich.console import Console

from maskkit.checkpoint import load_checkpoint
from maskkit.config import build_config
from maskkit.engine import run as runs
from maskkit.engine.finetune import Finetuner
from maskkit.engine.pretrain import majority_rate
from maskkit.models import ClassifierHead


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_medmnist_npz(folder / "dermamnist.npz", sizes=(48, 16, 16))
    return folder


def _config(policy: str, data_dir, seed: int = 0):
    return build_config(
        "smoke",
        overrides=[
            {
                "policy": policy,
                "seed": seed,
                "data": {"dataset": "dermamnist", "data_dir": str(data_dir)},
                "pretrain": {"steps": 2, "eval_every": 2},
                "finetune": {"epochs": 1},
            }
        ],
    )


@pytest.mark.slow
def test_every_policy_fine_tunes_from_the_same_fresh_head(data_dir, tmp_path, monkeypatch):
    starts: dict[str, dict[str, torch.Tensor]] = {}
    original = Finetuner.__post_init__

    def record(self: Finetuner) -> None:
        head = self.model.head.state_dict()
        starts[self.context.config.policy] = {key: value.clone() for key, value in head.items()}
        original(self)

    monkeypatch.setattr(Finetuner, "__post_init__", record)
    for policy in ("random", "mlo"):
        runs.train(_config(policy, data_dir), tmp_path / policy, Console(quiet=True))
    assert starts["random"].keys() == starts["mlo"].keys()
    assert all(torch.equal(starts["random"][key], starts["mlo"][key]) for key in starts["random"])
    # … and it is not the head that level 2 trained during the MLO stage.
    level2 = ClassifierHead(starts["mlo"]["linear.weight"].shape[1], 7)
    load_checkpoint(tmp_path / "mlo" / "checkpoints", "pretrained").load_into({"head": level2})
    assert not torch.equal(level2.linear.weight, starts["mlo"]["linear.weight"])
    # Stage 2 checkpoints carry the CUDA random state too (None on a machine without CUDA).
    state = load_checkpoint(tmp_path / "mlo" / "checkpoints", "final").state
    assert set(state["rng"]) == {"cpu", "cuda"}


def test_the_fresh_head_depends_on_the_seed_only(data_dir):
    def head(policy: str, seed: int) -> torch.Tensor:
        return runs.stage2_head(_config(policy, data_dir, seed), 7, torch.device("cpu")).linear.weight

    assert torch.equal(head("random", 0), head("mlo-light", 0))
    assert not torch.equal(head("random", 0), head("random", 1))


def test_majority_rate_is_the_accuracy_of_a_constant_guess():
    assert majority_rate(torch.tensor([5, 5, 5, 1, 0, 5])) == pytest.approx(4 / 6)
