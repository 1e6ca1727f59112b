"""The MLO levels' settings keys: ``pretrain.mae`` (level 1), ``pretrain.head`` (level 2),
``pretrain.mask`` (level 3). Configs with the old keys ``pretrain.pretrain`` and
``pretrain.finetune`` (YAML files, ``--set``, saved runs, suite files) keep loading, with one
warning line; a level under both names is refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml
from cli_helpers import assert_user_error, maskkit

from maskkit.bench.cells import expand_grid
from maskkit.bench.layout import SuiteLayout
from maskkit.bench.suite import load_suite
from maskkit.config import (
    LEVEL_KEYS,
    RENAMED_LEVELS_WARNING,
    build_config,
    config_to_yaml,
    load_run_config,
    merge_config_layers,
    parse_override,
    validate_config,
)
from maskkit.errors import ConfigError, MaskkitWarning

OLD_FILE = {"pretrain": {"pretrain": {"lr": 5.0e-4}, "finetune": {"lr": 2.0e-3, "unroll_steps": 3}}}


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, MaskkitWarning)]


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_an_old_config_file_loads_under_the_new_keys_with_one_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = build_config("smoke", _write(tmp_path / "old.yaml", OLD_FILE))
    assert _ours(caught) == [RENAMED_LEVELS_WARNING]
    levels = config.pretrain
    assert (levels.mae.lr, levels.head.lr, levels.head.unroll_steps) == (5.0e-4, 2.0e-3, 3)
    # The old key overrides the preset's setting of the same level, key by key: the preset's
    # batch size and 2/1/1 unroll stay (it does not meet the preset's `mae` as a second name).
    assert (levels.mae.batch_size, levels.mae.unroll_steps, levels.head.batch_size) == (32, 2, 32)
    saved = yaml.safe_load(config_to_yaml(config))["pretrain"]
    assert {"mae", "head", "mask"} <= saved.keys() and not {"pretrain", "finetune"} & saved.keys()


def test_an_old_set_option_loads_with_one_warning_line_on_the_command_line(tmp_path):
    result = maskkit(
        "config", "show", "--preset", "smoke", "--set", "pretrain.finetune.lr=0.02", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warned) == 1 and warned[0].startswith("warning:"), result.stderr
    assert "pretrain.finetune" in warned[0] and "pretrain.head" in warned[0]
    shown = yaml.safe_load(result.stdout)["pretrain"]
    assert shown["head"]["lr"] == 0.02 and shown["head"]["batch_size"] == 32
    assert "finetune" not in shown and "pretrain" not in shown


def test_new_keys_warn_nothing():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = build_config("paper", overrides=[parse_override("pretrain.head.lr=0.02")])
    assert not _ours(caught)
    assert config.pretrain.head.lr == 0.02


def test_a_level_under_both_names_is_refused(tmp_path):
    both = {"pretrain": {"pretrain": {"lr": 1.0e-4}, "mae": {"lr": 2.0e-4}}}
    with pytest.raises(ConfigError, match=r"pretrain\.pretrain and pretrain\.mae are one level"):
        build_config("smoke", overrides=[both])
    path = _write(tmp_path / "both.yaml", both)
    result = maskkit("config", "show", "--config", path, cwd=tmp_path)
    assert_user_error(
        result, "invalid config: pretrain:", "pretrain.pretrain and pretrain.mae", "keep pretrain.mae"
    )


def test_a_saved_run_config_with_the_old_keys_reads_under_the_new_ones(tmp_path):
    saved = yaml.safe_load(config_to_yaml(build_config("smoke")))
    levels = saved["pretrain"]
    levels["pretrain"], levels["finetune"] = levels.pop("mae"), levels.pop("head")
    levels["pretrain"]["lr"] = 7.0e-4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_run_config(_write(tmp_path / "config.yaml", saved))
    assert _ours(caught) == [RENAMED_LEVELS_WARNING]
    assert config.pretrain.mae.lr == 7.0e-4 and config == build_config(
        "smoke", overrides=[parse_override("pretrain.mae.lr=7.0e-4")]
    )


def test_an_old_key_over_a_saved_config_changes_that_setting():
    """``maskkit train --resume RUN --set pretrain.pretrain.lr=...``: the override is the new
    key's (which the resume check then refuses as a change), not a second name of it."""
    saved = build_config("smoke").model_dump(mode="json")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        merged = validate_config(merge_config_layers(saved, parse_override("pretrain.pretrain.lr=0.5")))
    assert merged.pretrain.mae.lr == 0.5


def test_a_suite_file_with_the_old_keys_gives_its_cells_the_new_ones(tmp_path):
    suite = {
        "name": "old",
        "preset": "smoke",
        "seeds": [0],
        "config": {"pretrain": {"steps": 3, "pretrain": {"batch_size": 16}}},
        "datasets": [{"dataset": "dermamnist"}],
        "policies": ["mlo"],
    }
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        (cell,) = expand_grid(load_suite(_write(tmp_path / "old.yaml", suite)), SuiteLayout(tmp_path / "o"))
    assert (cell.config.pretrain.mae.batch_size, cell.config.pretrain.mae.unroll_steps) == (16, 2)


def test_old_estimator_keys_override_a_presets_estimator():
    """Each layer's old keys are read before the layers merge: ``pretrain.mask.hypergradient``
    of a user's config overrides the ``paper`` preset's ``pretrain.hypergradient.estimator``."""
    old = {"pretrain": {"mask": {"hypergradient": "cg"}}}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert build_config("paper", overrides=[old]).pretrain.hypergradient.estimator == "cg"


def test_every_level_has_its_settings_key():
    config = build_config("smoke").pretrain
    assert [config.level(name) for name in ("pretrain", "finetune", "mask")] == [
        config.mae,
        config.head,
        config.mask,
    ]
    assert set(LEVEL_KEYS.values()) == {"mae", "head", "mask"}
