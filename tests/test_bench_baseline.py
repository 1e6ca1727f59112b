"""The no-pretraining baseline (``pretrain.steps: 0``, the bench's ``none``): the ViT from scratch."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import write_medmnist_npz
from rich.console import Console

from maskkit.checkpoint import load_checkpoint
from maskkit.config import build_config
from maskkit.engine import run as runs
from maskkit.errors import ConfigError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_medmnist_npz(folder / "dermamnist.npz", sizes=(48, 16, 16))
    return folder


def _config(policy: str, data_dir, steps: int):
    return build_config(
        "smoke",
        overrides=[
            {
                "policy": policy,
                "data": {"dataset": "dermamnist", "data_dir": str(data_dir)},
                "pretrain": {"steps": steps, "eval_every": 2},
                "finetune": {"epochs": 1},
            }
        ],
    )


@pytest.mark.slow
def test_zero_pretrain_steps_trains_the_initial_vit_whatever_the_policy(data_dir, tmp_path):
    summaries = {}
    for policy in ("random", "mlo-light"):
        config = _config(policy, data_dir, steps=0)
        runs.train(config, tmp_path / policy, Console(quiet=True))
        summaries[policy] = json.loads((tmp_path / policy / "summary.json").read_text())
        # The "pretrained" encoder is the initial one, drawn from the seed as in every run.
        fresh, _, _ = runs.build_models(config, 7, torch.device("cpu"))
        pretrained = load_checkpoint(tmp_path / policy / "checkpoints", "pretrained").weights["mae"]
        assert all(torch.equal(value, pretrained[key]) for key, value in fresh.state_dict().items())
    assert summaries["random"]["pretrain"]["steps"] == 0
    assert summaries["mlo-light"]["pretrain"]["level_steps"] == {"pretrain": 0, "finetune": 0, "mask": 0}
    # Nothing of the policy reaches stage 2: the same encoder, head and data give the same model.
    assert (
        summaries["random"]["test"]["confusion_matrix"] == summaries["mlo-light"]["test"]["confusion_matrix"]
    )


def test_negative_pretrain_steps_are_refused(data_dir):
    with pytest.raises(ConfigError, match=r"pretrain\.steps"):
        _config("random", data_dir, steps=-1)
