"""The hypergradient estimators: one registry, one config object, old keys still read."""

from __future__ import annotations

import warnings

import pytest

from maskkit.config import build_config, parse_override
from maskkit.engine import hypergradient
from maskkit.errors import ConfigError, MaskkitWarning


def test_the_config_accepts_exactly_the_registered_estimators(monkeypatch):
    for name in hypergradient.ESTIMATORS:
        config = build_config("smoke", overrides=[parse_override(f"pretrain.hypergradient.estimator={name}")])
        assert config.pretrain.hypergradient.estimator == name
    with pytest.raises(ConfigError, match="unknown estimator 'neumann'; choose one of darts, cg"):
        build_config("smoke", overrides=[parse_override("pretrain.hypergradient.estimator=neumann")])
    # A new estimator is one registry entry: the config takes it with no other change.
    monkeypatch.setitem(hypergradient.ESTIMATORS, "neumann", hypergradient.darts_product)
    config = build_config("smoke", overrides=[parse_override("pretrain.hypergradient.estimator=neumann")])
    assert config.pretrain.hypergradient.estimator == "neumann"


def test_old_estimator_keys_under_the_mask_level_load_with_one_warning():
    old = {
        "pretrain": {"mask": {"lr": 2.0e-4, "hypergradient": "cg", "cg_iterations": 3, "darts_alpha": 0.5}}
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = build_config("smoke", overrides=[old])
    settings = config.pretrain.hypergradient
    assert (settings.estimator, settings.cg_iterations, settings.darts_alpha) == ("cg", 3, 0.5)
    assert config.pretrain.mask.lr == 2.0e-4  # the level's own keys stay where they were
    ours = [w for w in caught if issubclass(w.category, MaskkitWarning)]
    assert len(ours) == 1
    assert "pretrain.mask.hypergradient → pretrain.hypergradient.estimator" in str(ours[0].message)
    # The saved config has only the new keys.
    assert "hypergradient" not in config.pretrain.mask.model_dump()


def test_a_config_without_old_keys_warns_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_config("paper")
    assert not [w for w in caught if issubclass(w.category, MaskkitWarning)]
