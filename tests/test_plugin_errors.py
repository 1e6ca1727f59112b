"""``maskkit train`` with a plugin that fails: while it is built, in its forward, after a
checkpoint, or because it failed to load. Each ends in one ``error:`` line (the traceback only
with ``MASKKIT_DEBUG=1``), and a run dir is kept only when it holds a checkpoint to resume.

The command runs in this process (``maskkit.cli.main()``), with the pip-installed plugin sites
of conftest.py on ``sys.path``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import assert_one_clean_error_line, run_cli_in_process, train_args
from plugin_packages import BUILT_INS

from maskkit.plugins import get_registry


@pytest.fixture
def registry_with(monkeypatch: pytest.MonkeyPatch, plugin_sites: list[Path]):
    """Put a ``--target`` site on ``sys.path`` for the in-process registry, let the tests see its
    plugins (``plugin_sites``), and clear the registry's cache around."""

    def add(site: Path) -> None:
        monkeypatch.syspath_prepend(str(site))
        plugin_sites.append(site)
        get_registry.cache_clear()

    get_registry.cache_clear()
    yield add
    monkeypatch.undo()
    get_registry.cache_clear()


def test_train_with_a_policy_whose_constructor_raises(
    good_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(good_site)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli_in_process(train_args("fragile", data_dir, run_dir), capsys, monkeypatch)
    assert_one_clean_error_line(
        result, "'fragile'", "maskkit-faulty", "RuntimeError: the fragile policy cannot be built"
    )
    assert not run_dir.exists()


def test_an_exception_in_a_plugins_forward_is_one_line_and_leaves_no_run_dir(
    good_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(good_site)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    for attempt in range(2):  # the same --run-dir again: the same error, not "already holds files"
        result = run_cli_in_process(train_args("shape-bug", data_dir, run_dir), capsys, monkeypatch)
        assert_one_clean_error_line(
            result,
            "mask policy 'shape-bug' (maskkit-faulty) raised in its forward at maskkit_faulty/policies.py:",
            "RuntimeError: The size of tensor a (15) must match the size of tensor b (16)",
            "MASKKIT_DEBUG=1",
        )
        assert not run_dir.exists(), f"attempt {attempt}: a failed first forward left {run_dir}"
    # An empty --run-dir the user made beforehand is left as it was: empty.
    run_dir.mkdir()
    result = run_cli_in_process(train_args("shape-bug", data_dir, run_dir), capsys, monkeypatch)
    assert result.returncode == 2 and run_dir.is_dir() and not any(run_dir.iterdir())


def test_maskkit_debug_prints_the_plugins_traceback(
    good_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(good_site)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKKIT_DEBUG", "1")
    result = run_cli_in_process(train_args("shape-bug", data_dir, tmp_path / "run"), capsys, monkeypatch)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "policies.py" in result.stderr
    assert result.stderr_lines[-1].startswith("error: mask policy 'shape-bug'")


@pytest.mark.slow
def test_a_run_that_fails_after_a_checkpoint_keeps_its_run_dir(
    good_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(good_site)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = [*train_args("late-failure", data_dir, run_dir), "--set", "pretrain.checkpoint_every=1"]
    result = run_cli_in_process(args, capsys, monkeypatch)
    assert_one_clean_error_line(result, "'late-failure'", "ValueError: out of luck at call 3")
    assert (run_dir / "config.yaml").is_file()
    assert json.loads((run_dir / "checkpoints" / "last.json").read_text())["step"] == 2  # kept for --resume


def test_an_unknown_policy_names_the_plugins_that_failed_to_load(
    broken_site: Path,
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry_with(broken_site)
    monkeypatch.chdir(tmp_path)
    result = run_cli_in_process(
        train_args("exploding-policy", data_dir, tmp_path / "run"), capsys, monkeypatch
    )
    line = assert_one_clean_error_line(
        result,
        f"unknown policy 'exploding-policy'. Available: {', '.join(sorted(BUILT_INS))}.",
        "2 plugins failed to load and may provide it:",
        "'exploding' from maskkit-exploding (RuntimeError: kaboom while importing)",
        "'nap' from maskkit-not-a-policy",
        "`maskkit policies` lists them",
    )
    assert "Reinstall" not in line


def test_train_with_an_unknown_policy(
    data_dir: Path,
    tmp_path: Path,
    registry_with,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    result = run_cli_in_process(train_args("nosuch", data_dir, run_dir), capsys, monkeypatch)
    line = assert_one_clean_error_line(result, "'nosuch'", "Available:")
    for name in BUILT_INS:
        assert name in line
    assert not run_dir.exists()
    assert not (tmp_path / "runs").exists()


def test_an_error_message_with_brackets_is_printed_verbatim(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli_in_process(train_args("[/x]", data_dir, tmp_path / "run"), capsys, monkeypatch)
    assert_one_clean_error_line(result, "unknown policy '[/x]'")
