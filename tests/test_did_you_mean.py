"""A mistyped name or config key points at the nearest valid one (``maskkit.errors.closest_name``):
policies, datasets, prior providers, presets and config keys, in the API and on the command line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import MASKKIT_CLI
from pydantic import BaseModel

from maskkit.config import StrictModel, build_config
from maskkit.config_keys import suggested_keys
from maskkit.data import load_dataset
from maskkit.errors import ConfigError, UnknownNameError, closest_name
from maskkit.plugins import policy_info, provider_info


def test_closest_name_ignores_case_and_finds_nothing_far():
    assert closest_name("radnom", ["mlo", "random", "blockwise"]) == "random"
    assert closest_name("MLO", ["mlo", "random"]) == "mlo"
    assert closest_name("nosuch", ["mlo", "random"]) is None
    assert closest_name("x", []) is None


@pytest.mark.parametrize(
    ("lookup", "typed", "meant"),
    [
        (policy_info, "radnom", "random"),
        (policy_info, "mlo-lihgt", "mlo-light"),
        (provider_info, "ostu", "otsu"),
        (provider_info, "salency", "saliency"),
        (lambda name: load_dataset(name, Path("."), image_size=8), "dermamnsit", "dermamnist"),
        (lambda name: build_config(name), "smoek", "smoke"),
    ],
)
def test_an_unknown_name_suggests_the_nearest(lookup, typed, meant):
    with pytest.raises(UnknownNameError) as caught:
        lookup(typed)
    assert caught.value.nearest == meant
    assert f"unknown {caught.value.kind} '{typed}'. Did you mean '{meant}'? Available: " in str(caught.value)


def test_a_name_near_nothing_only_lists_the_available_ones():
    with pytest.raises(UnknownNameError) as caught:
        policy_info("zzzzzz")
    assert "Did you mean" not in str(caught.value) and "Available: " in str(caught.value)


@pytest.mark.parametrize(
    ("assignment", "meant"),
    [
        ({"pretrain": {"epoch": 2}}, "did you mean pretrain.epochs?"),
        ({"model": {"embed_dm": 8}}, "did you mean model.embed_dim?"),
        ({"polcy": "mlo"}, "did you mean policy?"),
        ({"pretrain": {"mask": {"lrr": 1}}}, "did you mean pretrain.mask.lr?"),
        # A key that belongs one level down: every place it exists there.
        (
            {"pretrain": {"lr": 1}},
            "did you mean pretrain.mae.lr, pretrain.head.lr or pretrain.mask.lr?",
        ),
    ],
)
def test_an_unknown_config_key_suggests_the_nearest_valid_key(assignment, meant):
    with pytest.raises(ConfigError) as caught:
        build_config("smoke", overrides=[assignment])
    assert f"unknown key ({meant} `maskkit config show` lists valid keys)" in str(caught.value)


def test_an_unknown_config_key_near_nothing_says_check_the_spelling():
    with pytest.raises(ConfigError, match=r"zzz: unknown key \(check the spelling; `maskkit config show`"):
        build_config("smoke", overrides=[{"zzz": 1}])


def test_suggested_keys_walks_lists_and_optional_models():
    class Leaf(StrictModel):
        learning_rate: float = 1.0

    class Root(BaseModel):
        items: list[Leaf] = []
        maybe: Leaf | None = None

    assert suggested_keys(Root, ("items", 2, "learning_rat")) == ["items[2].learning_rate"]
    assert suggested_keys(Root, ("maybe", "learnin_rate")) == ["maybe.learning_rate"]
    assert suggested_keys(Root, ("learning_rate",)) == ["items.learning_rate", "maybe.learning_rate"]
    assert suggested_keys(Root, ("nowhere", "x")) == []


def maskkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COLUMNS": "300"}
    return subprocess.run(
        [*MASKKIT_CLI, *map(str, args)], capture_output=True, text=True, env=environment, cwd=cwd, timeout=600
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("train", "--preset", "smoke", "--policy", "radnom"), "Did you mean 'random'?"),
        (("train", "--preset", "smoke", "--dataset", "dermamnsit"), "Did you mean 'dermamnist'?"),
        (
            ("train", "--preset", "smoke", "--policy", "semantic-soft", "--prior", "ostu"),
            "Did you mean 'otsu'?",
        ),
        (("priors", "build", "--provider", "ostu", "--dataset", "dermamnist"), "Did you mean 'otsu'?"),
        (("config", "show", "--set", "pretrain.lr=1"), "did you mean pretrain.mae.lr,"),
    ],
)
def test_the_command_line_suggests_in_one_line(tmp_path, args, expected):
    data_options = () if args[0] == "config" else ("--data-dir", tmp_path / "data")
    result = maskkit(*args, *data_options, cwd=tmp_path)  # a run dir would default to ./runs/...
    assert result.returncode == 2, result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert expected in lines[0]
    assert not list(tmp_path.iterdir())  # nothing half-made: no run dir, no data folder
