"""The priors store: built once per split, found again, never stale, safe under two builders."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from helpers import synthetic_dataset
from rich.console import Console

from maskkit.engine.priors import PriorsNotBuiltError, PriorSpec, attach_priors, store_paths
from maskkit.priors.store import PriorStore
from maskkit_plugins.center_prior import CenterPrior

QUIET = Console(quiet=True)


def _spec(tmp_path, provider: str = "otsu", build: bool = False, **options) -> PriorSpec:
    return PriorSpec(
        provider, options, dataset="synthetic", image_size=16, store_dir=tmp_path / "store", build=build
    )


def test_priors_are_built_once_and_then_loaded(tmp_path, monkeypatch) -> None:
    dataset = synthetic_dataset(size=16)
    with pytest.raises(PriorsNotBuiltError) as error:
        attach_priors(dataset, _spec(tmp_path), QUIET)
    message = str(error.value)
    assert "\n" not in message
    assert "maskkit priors build --provider otsu --dataset synthetic --image-size 16 --priors-dir" in message
    assert "--build-priors" in message
    assert not (tmp_path / "store").exists()  # a refused run leaves nothing behind

    built = attach_priors(dataset, _spec(tmp_path, build=True), QUIET)
    paths = store_paths(dataset, _spec(tmp_path))
    assert sorted(paths) == ["test", "train", "val"] and all(path.is_file() for path in paths.values())
    for name in ("train", "val", "test"):
        split = getattr(built, name)
        assert torch.equal(split.images, getattr(dataset, name).images)
        assert set(split.priors) == {"importance", "foreground"}
        assert split.priors["importance"].shape == (len(split), 16, 16)
        assert split.priors["importance"].dtype == torch.uint8

    # Found again without computing anything.
    monkeypatch.setattr("maskkit_plugins.otsu_prior.OtsuPrior.compute", lambda *a: pytest.fail("recomputed"))
    again = attach_priors(dataset, _spec(tmp_path), QUIET)
    for name in ("train", "val", "test"):
        assert torch.equal(
            getattr(again, name).priors["importance"], getattr(built, name).priors["importance"]
        )


@pytest.mark.parametrize(
    "change",
    ["provider option", "resolution", "data", "provider"],
)
def test_a_changed_key_never_reuses_the_stored_priors(tmp_path, change) -> None:
    dataset = synthetic_dataset(size=16)
    attach_priors(dataset, _spec(tmp_path, build=True), QUIET)
    spec = _spec(tmp_path)
    if change == "provider option":
        spec = _spec(tmp_path, kernel=0.2)
    elif change == "resolution":
        dataset = synthetic_dataset(size=8)
    elif change == "data":  # another data file: other images, same names and sizes
        dataset = synthetic_dataset(size=16, seed=1)
    else:
        spec = _spec(tmp_path, provider="center")
    with pytest.raises(PriorsNotBuiltError, match="are not built yet"):
        attach_priors(dataset, spec, QUIET)


def test_defaults_given_explicitly_find_the_same_store(tmp_path) -> None:
    dataset = synthetic_dataset(size=16)
    attach_priors(dataset, _spec(tmp_path, build=True), QUIET)
    attach_priors(dataset, _spec(tmp_path, polarity="dark", kernel=0.1), QUIET)  # no error: found


def test_a_changed_data_file_changes_every_split_key(tmp_path) -> None:
    first = store_paths(synthetic_dataset(size=16), _spec(tmp_path))
    second = store_paths(synthetic_dataset(size=16, seed=1), _spec(tmp_path))
    assert all(first[name] != second[name] for name in first)
    assert all(first[name].parent == second[name].parent for name in first)  # same provider folder


def test_two_builds_at_once_compute_once_and_leave_one_valid_store(tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    original = CenterPrior.compute

    def slow(self, images):
        calls.append(len(images))
        time.sleep(0.3)  # the two builders overlap
        return original(self, images)

    monkeypatch.setattr(CenterPrior, "compute", slow)
    dataset = synthetic_dataset(size=16)
    spec = _spec(tmp_path, provider="center", build=True)
    results, errors = [], []

    def build() -> None:
        try:
            results.append(attach_priors(dataset, spec, QUIET))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(calls) == 3  # one computation per split, not two
    store = spec.store.root
    assert (
        sorted(path.suffix for path in store.rglob("*") if path.is_file() and path.suffix != ".lock")
        == [".safetensors"] * 3
    )
    assert not list(store.rglob("*.tmp"))
    for name in ("train", "val", "test"):
        assert torch.equal(
            getattr(results[0], name).priors["importance"], getattr(results[1], name).priors["importance"]
        )


def test_a_store_file_of_the_wrong_shape_is_not_used(tmp_path) -> None:
    dataset = synthetic_dataset(size=16)
    attach_priors(dataset, _spec(tmp_path, build=True), QUIET)
    path = store_paths(dataset, _spec(tmp_path))["train"]
    from maskkit.cache import write_tensors_atomically

    write_tensors_atomically(path, {"importance": torch.zeros(2, 3, 3, dtype=torch.uint8)})
    with pytest.raises(PriorsNotBuiltError):
        attach_priors(dataset, _spec(tmp_path), QUIET)
    assert isinstance(_spec(tmp_path).store, PriorStore)
