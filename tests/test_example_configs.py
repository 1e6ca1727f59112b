"""Every YAML in examples/configs is a valid run config, and each built-in policy and dataset has one;
a guided policy's names a prior provider that gives the maps it reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from maskkit.config import PRESETS, build_config
from maskkit.data import dataset_names
from maskkit.plugins import get_registry

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
POLICY_CONFIGS = sorted((CONFIGS / "policies").glob("*.yaml"))
DATASET_CONFIGS = sorted((CONFIGS / "datasets").glob("*.yaml"))
# One config per kind of dataset maskkit reads (any other MedMNIST flag works as pathmnist does).
DATASET_FAMILIES = {"dermamnist", "pathmnist", "cifar10", "cifar100", "imagefolder"}


def _built_in_policies() -> set[str]:
    return {name for name, info in get_registry().policies.items() if info.distribution == "maskkit"}


@pytest.mark.parametrize("path", POLICY_CONFIGS + DATASET_CONFIGS, ids=lambda path: path.name)
@pytest.mark.parametrize("preset", PRESETS)
def test_each_example_config_loads_over_each_preset(path: Path, preset: str) -> None:
    raw = yaml.safe_load(path.read_text())
    config = build_config(preset, path)
    if "policy" in raw:
        assert config.policy == raw["policy"]
        assert config.policy_options == raw.get("policy_options", {})
    if "data" in raw:
        assert config.data.dataset == raw["data"]["dataset"]


def test_every_built_in_policy_has_an_example_config() -> None:
    names = {path.stem for path in POLICY_CONFIGS}
    assert names == _built_in_policies()
    for path in POLICY_CONFIGS:
        assert yaml.safe_load(path.read_text())["policy"] == path.stem


def test_every_dataset_family_has_an_example_config() -> None:
    datasets = {yaml.safe_load(path.read_text())["data"]["dataset"] for path in DATASET_CONFIGS}
    assert datasets == DATASET_FAMILIES
    assert datasets <= set(dataset_names())
    assert {path.stem for path in DATASET_CONFIGS} == datasets


def test_policy_options_in_the_examples_are_ones_the_policy_takes() -> None:
    from maskkit.plugins import create_policy
    from maskkit.policy import PolicyContext

    context = PolicyContext(num_patches=16, embed_dim=8, grid_size=4, patch_size=8)
    for path in POLICY_CONFIGS:
        config = build_config("smoke", path)
        create_policy(config.policy, context, config.policy_options)  # raises on an unknown option


@pytest.mark.parametrize("preset", PRESETS)
def test_a_policy_that_reads_priors_gets_a_provider_that_gives_them(preset: str) -> None:
    from maskkit.engine.priors import check_prior_choice
    from maskkit.plugins import policy_info

    guided = 0
    for path in POLICY_CONFIGS:
        config = build_config(preset, path)
        requires = policy_info(config.policy).requires
        check_prior_choice(config, requires)  # raises: no provider, a wrong one, or one for nothing
        guided += bool(requires)
    assert guided == 6  # semantic-soft, region-ratio, constraint, each with and without MLO
