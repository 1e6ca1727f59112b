"""The priors on the command line: `maskkit priors list` and `build`, `train --prior`, a
third-party provider, `visualize` of a guided run, and each mistake a user can make: one
`error:` line, exit code 2, nothing half-made left and nothing built lost."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import CliResult, assert_one_clean_error_line, run_cli_in_process
from helpers import write_medmnist_npz
from PIL import Image
from plugin_packages import FakeEntryPoint

import maskkit.plugins as plugins_module
from maskkit.hookspecs import hookimpl
from maskkit.plugins import get_registry
from maskkit.priors.provider import IMPORTANCE, PriorProvider

#: maskkit's own entry points (pyproject.toml's ``[project.entry-points.maskkit]``): name → module.
BUILT_IN_MODULES = {
    entry_point.name: entry_point.value
    for entry_point in importlib.metadata.entry_points(group="maskkit")
    if entry_point.dist is not None and entry_point.dist.name == "maskkit"
}


class StripesPrior(PriorProvider):
    """A third party's provider: the left half of every image is important."""

    name = "stripes"
    description = "Test plugin: the left half matters."

    def __init__(self, width: float = 0.5) -> None:
        self.width = width

    def compute(self, images):
        count, height, width = images.shape[:3]
        importance = np.zeros((count, height, width), dtype=np.float32)
        importance[:, :, : round(self.width * width)] = 1.0
        return {IMPORTANCE: importance}


def _stripes_module() -> types.ModuleType:
    module = types.ModuleType("maskkit_stripes")

    @hookimpl
    def maskkit_prior_providers():
        return [StripesPrior]

    module.maskkit_prior_providers = maskkit_prior_providers  # type: ignore[attr-defined]
    return module


@pytest.fixture
def third_party(monkeypatch):
    """The built-in plugins plus ``maskkit-stripes`` as the only installed entry points."""
    entry_points = [
        FakeEntryPoint(name, lambda module=module: importlib.import_module(module), "maskkit")
        for name, module in BUILT_IN_MODULES.items()
    ]
    entry_points.append(FakeEntryPoint("stripes", _stripes_module, "maskkit-stripes"))

    def entry_points_for(group=None, **_):
        # An EntryPoints (it has .select), as other libraries that look up entry points on their
        # first import (fsspec, when the command imports torch's stack) expect.
        return importlib.metadata.EntryPoints(entry_points if group == "maskkit" else [])

    monkeypatch.setattr(plugins_module.importlib.metadata, "entry_points", entry_points_for)
    get_registry.cache_clear()
    yield
    monkeypatch.undo()
    get_registry.cache_clear()


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run ``maskkit ARGS`` in-process from ``tmp_path``, with the priors store under it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASKKIT_PRIORS_DIR", str(tmp_path / "store"))

    def run(*args) -> CliResult:
        return run_cli_in_process([str(arg) for arg in args], capsys, monkeypatch)

    return run


def _train(data_dir: Path, policy: str, *extra) -> list[str]:
    return ["train", "--policy", policy, "--dataset", "dermamnist", "--data-dir", str(data_dir),
            "--preset", "smoke", "--device", "cpu", *extra]  # fmt: skip


def _listed(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if len(cells) == 5 and cells[0] and cells[0] != "name":
            rows[cells[0]] = cells[1:]
    return rows


def _store_files(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*.safetensors")}


def test_priors_list_shows_the_built_in_providers(cli) -> None:
    result = cli("priors", "list")
    assert result.returncode == 0, result.stderr
    listed = _listed(result.stdout)
    assert set(listed) >= {"center", "otsu", "saliency", "sam"}
    assert listed["otsu"][0] == "maskkit" and listed["otsu"][1] == "foreground, importance"
    assert "priors store:" in result.stdout and result.stderr_lines == []


def test_a_third_party_provider_is_listed_and_used(third_party, cli, data_dir, tmp_path) -> None:
    listed = _listed(cli("priors", "list").stdout)
    assert listed["stripes"][:2] == ["maskkit-stripes", "importance"]
    assert listed["otsu"][0] == "maskkit"

    # It supplies only `importance`: a policy reading `foreground` is refused, naming that.
    result = cli(*_train(data_dir, "region-ratio-fixed", "--prior", "stripes"))
    assert_one_clean_error_line(result, "prior map foreground", "'stripes'", "gives importance")

    built = cli("priors", "build", "--provider", "stripes", "--dataset", "dermamnist", "--data-dir", data_dir,
                "--subset", 256, "--option", "width=0.25")  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert len(_store_files(tmp_path / "store")) == 3

    run_dir = tmp_path / "run"
    result = cli(*_train(data_dir, "semantic-soft-fixed", "--prior", "stripes", "--run-dir", run_dir,
                         "--set", "prior_options.width=0.25", "--set", "policy_options.beta=8"))  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    masks = json.loads((run_dir / "summary.json").read_text())["pretrain"]["mask_statistics"]
    # The important left quarter is masked far less than the rest.
    assert masks["guidance/masked_share_important"] < 0.5 * masks["guidance/masked_share_unimportant"]


@pytest.mark.slow
def test_a_guided_run_from_the_printed_build_command_to_the_picture(cli, data_dir, tmp_path) -> None:
    run_dir = tmp_path / "run"
    # Not built: one line with the exact command; no run dir, nothing in the store.
    refused = cli(*_train(data_dir, "semantic-soft", "--prior", "otsu", "--run-dir", run_dir))
    line = assert_one_clean_error_line(refused, "not built yet", "--build-priors")
    command = re.search(r"`(maskkit priors build [^`]+)`", line).group(1)
    assert command == (
        f"maskkit priors build --provider otsu --dataset dermamnist --data-dir {data_dir} "
        "--image-size 32 --subset 256"
    )
    assert not run_dir.exists() and not (tmp_path / "store").exists()

    built = cli(*shlex.split(command)[1:])
    assert built.returncode == 0, built.stderr
    stored = _store_files(tmp_path / "store")
    assert len(stored) == 3

    # The config key works as --prior does.
    result = cli(*_train(data_dir, "semantic-soft", "--set", "prior=otsu", "--run-dir", run_dir))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pretrain = [record for record in records if record["stage"] == "pretrain" and "loss/mask" in record]
    assert pretrain and all("policy/beta" in record for record in pretrain)
    assert any("guidance/masked_share_important" in record for record in pretrain)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "policy/beta" in summary["pretrain"]["mask_statistics"]

    picture = tmp_path / "grid.png"
    shown = cli("visualize", run_dir, "--num-images", 3, "--output", picture)
    assert shown.returncode == 0, shown.stderr
    with Image.open(picture) as image:
        assert image.size[0] > 1.4 * image.size[1]  # five columns (prior, probability, …) of three rows

    # A later mistake loses nothing: the store and the finished run are as they were.
    finished = (run_dir / "summary.json").read_text()
    failed = cli(*_train(data_dir, "semantic-soft", "--prior", "sam", "--run-dir", tmp_path / "other"))
    assert_one_clean_error_line(failed, "checkpoint=PATH")
    assert _store_files(tmp_path / "store") == stored
    assert (run_dir / "summary.json").read_text() == finished
    assert not (tmp_path / "other").exists()


def test_an_unknown_provider_is_one_line(cli, data_dir, tmp_path) -> None:
    built = cli("priors", "build", "--provider", "nosuch", "--dataset", "dermamnist", "--data-dir", data_dir)
    assert_one_clean_error_line(built, "unknown prior provider 'nosuch'", "otsu", "saliency")
    trained = cli(*_train(data_dir, "semantic-soft", "--prior", "nosuch", "--run-dir", tmp_path / "run"))
    assert_one_clean_error_line(trained, "unknown prior provider 'nosuch'")
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


def test_a_missing_sam_checkpoint_is_one_line(cli, data_dir, tmp_path) -> None:
    result = cli("priors", "build", "--provider", "sam", "--dataset", "dermamnist", "--data-dir", data_dir)
    assert_one_clean_error_line(
        result, "'sam' needs a SAM checkpoint", "--option checkpoint=PATH", "github.com/facebookresearch"
    )
    missing = cli("priors", "build", "--provider", "sam", "--dataset", "dermamnist", "--data-dir", data_dir,
                  "--option", f"checkpoint={tmp_path / 'nope.pth'}")  # fmt: skip
    assert_one_clean_error_line(missing, "does not exist")
    assert not (tmp_path / "store").exists()


def test_a_prior_choice_that_cannot_work_is_one_line(cli, data_dir, tmp_path) -> None:
    without = cli(*_train(data_dir, "constraint", "--run-dir", tmp_path / "run"))
    assert_one_clean_error_line(without, "policy 'constraint' reads the prior map importance", "--prior")
    needless = cli(*_train(data_dir, "random", "--prior", "otsu", "--run-dir", tmp_path / "run"))
    assert_one_clean_error_line(needless, "policy 'random' reads no prior")
    build = ["priors", "build", "--provider", "otsu", "--dataset", "dermamnist", "--data-dir", data_dir]
    bad_option = cli(*build, "--option", "kernal=3")
    assert_one_clean_error_line(bad_option, "'otsu'", "kernal")
    randaugment = cli(
        *_train(data_dir, "constraint", "--prior", "otsu", "--set", "pretrain.augment=randaugment")
    )
    assert_one_clean_error_line(randaugment, "randaugment")
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


def test_a_changed_data_file_option_or_resolution_does_not_find_the_built_store(cli, tmp_path) -> None:
    data = tmp_path / "data"
    write_medmnist_npz(data / "dermamnist.npz", sizes=(16, 8, 8))
    build = ["priors", "build", "--provider", "center", "--dataset", "dermamnist", "--data-dir", data]
    assert cli(*build).returncode == 0
    again = cli(*build)
    assert again.returncode == 0 and again.stdout.count("already built") == 3
    train = _train(data, "semantic-soft-fixed", "--prior", "center", "--run-dir", tmp_path / "run")
    for change in (["--set", "prior_options.sigma=0.3"], ["--set", "model.img_size=16"]):
        assert_one_clean_error_line(cli(*train, *change), "not built yet")
    with np.load(data / "dermamnist.npz") as arrays:
        changed = {key: arrays[key].copy() for key in arrays.files}
    changed["test_images"][0] = 255 - changed["test_images"][0]  # one image of one split differs
    np.savez(data / "dermamnist.npz", **changed)
    line = assert_one_clean_error_line(cli(*train), "not built yet")
    assert "(test at 32 px)" in line  # only the split whose pixels changed
    assert not (tmp_path / "run").exists()


BOX_LINE = re.compile(r"^[┏┃┡│└]")


def test_priors_list_fits_a_narrow_window_and_has_json(cli) -> None:
    result = cli("priors", "list")
    table = [line.rstrip() for line in result.stdout.splitlines() if BOX_LINE.match(line)]
    assert table and max(map(len, table)) <= 110  # options one a line, descriptions wrapped
    assert any("│ model_type='vit_b'" in line for line in table)
    listing = json.loads(cli("priors", "list", "--json").stdout)
    providers = {provider["name"]: provider for provider in listing["providers"]}
    assert set(providers) >= {"center", "otsu", "saliency", "sam"}
    assert providers["otsu"]["provides"] == ["foreground", "importance"]
    assert providers["otsu"]["options"]["polarity"] == "dark"
    assert providers["sam"]["options"]["checkpoint"] is None
    assert listing["failures"] == [] and listing["store"].endswith("store")


def test_a_subset_run_is_served_from_the_whole_splits_priors(cli, data_dir, tmp_path) -> None:
    built = cli("priors", "build", "--provider", "otsu", "--dataset", "dermamnist", "--data-dir", data_dir)
    assert built.returncode == 0, built.stderr
    stored = _store_files(tmp_path / "store")
    assert len(stored) == 3  # the whole splits: 64, 32 and 32 images
    run_dir = tmp_path / "run"
    result = cli(*_train(data_dir, "semantic-soft-fixed", "--prior", "otsu", "--run-dir", run_dir,
                         "--set", "data.subset=16"))  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert _store_files(tmp_path / "store") == stored  # nothing built for the subset, nothing rebuilt


def test_a_subsets_priors_are_the_first_of_the_whole_splits(tmp_path) -> None:
    import dataclasses

    from helpers import synthetic_dataset
    from rich.console import Console

    from maskkit.data import limit_dataset
    from maskkit.engine.priors import PriorsNotBuiltError, PriorSpec, attach_priors

    quiet = Console(quiet=True)
    whole = synthetic_dataset()
    spec = PriorSpec("center", dataset=whole.name, image_size=8, store_dir=tmp_path / "store")
    built = attach_priors(whole, dataclasses.replace(spec, build=True), quiet)
    subset = limit_dataset(whole, 5)
    with pytest.raises(PriorsNotBuiltError, match="serve every subset"):
        attach_priors(subset, spec, quiet)  # without the whole dataset to look in
    served = attach_priors(subset, spec, quiet, whole=whole)
    for name in ("train", "val", "test"):
        assert torch.equal(
            getattr(served, name).priors["importance"], getattr(built, name).priors["importance"][:5]
        )
    # Not the first images of the whole split (other pixels): not served from it.
    shifted = dataclasses.replace(subset.train, images=255 - subset.train.images)
    other = dataclasses.replace(subset, train=shifted)
    with pytest.raises(PriorsNotBuiltError, match=r"\(train at 8 px\)"):
        attach_priors(other, spec, quiet, whole=whole)
