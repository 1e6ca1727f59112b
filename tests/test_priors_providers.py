"""The built-in prior providers: shapes and ranges, what each finds, SAM end to end on a tiny
randomly initialised model (no download), and the errors a user can cause."""

from __future__ import annotations

import io
import zipfile
from functools import partial

import numpy as np
import pytest
import torch
from helpers import SHARED_DATA
from PIL import Image

from maskkit.errors import ConfigError, PluginError, UnknownNameError
from maskkit.plugins import create_provider, get_registry, provider_options
from maskkit.priors.compute import compute_priors
from maskkit.priors.provider import FOREGROUND, IMPORTANCE, MalformedPriorError, PriorProvider

BUILT_IN_PROVIDERS = {"center", "otsu", "saliency", "sam"}
# Weight-free providers and option sets, checked on the same images.
WEIGHT_FREE = [
    ("center", {}),
    ("otsu", {}),
    ("otsu", {"polarity": "auto", "channel": "blue", "component": "all", "softness": 0.0}),
    ("saliency", {"method": "spectral_residual"}),
    ("saliency", {"method": "fine_grained"}),
]


def _random_images(count: int = 5, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _disk_image(size: int = 48, centre=(22, 27), radius: int = 11, seed: int = 0):
    """Skin-coloured noisy background with a dark disk: ``([H, W, 3] uint8, [H, W] bool disk)``."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    disk = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = (225, 180, 165)
    image[disk] = (110, 60, 50)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), disk


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_the_registry_holds_the_built_in_providers() -> None:
    registry = get_registry()
    assert set(registry.providers) >= BUILT_IN_PROVIDERS
    for name in BUILT_IN_PROVIDERS:
        assert registry.providers[name].distribution == "maskkit"
        assert registry.providers[name].provides == {IMPORTANCE, FOREGROUND}


@pytest.mark.parametrize(("name", "options"), WEIGHT_FREE)
def test_maps_have_the_images_shape_and_lie_in_the_unit_interval(name, options) -> None:
    provider = create_provider(name, options)
    images = _random_images()
    maps = provider.compute(images)
    assert set(maps) == {IMPORTANCE, FOREGROUND}
    for values in maps.values():
        assert values.shape == (5, 16, 16)
        assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1
    assert set(np.unique(maps[FOREGROUND])) <= {0.0, 1.0}
    # What the store keeps: uint8 [N, H, W], one tensor per map, from [N, 3, H, W] uint8 images.
    stored = compute_priors(provider, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert {key: (value.dtype, tuple(value.shape)) for key, value in stored.items()} == {
        IMPORTANCE: (torch.uint8, (5, 16, 16)),
        FOREGROUND: (torch.uint8, (5, 16, 16)),
    }
    assert set(stored[FOREGROUND].unique().tolist()) <= {0, 255}


@pytest.mark.parametrize("polarity", ["dark", "auto"])
def test_otsu_finds_a_drawn_disk(polarity) -> None:
    image, disk = _disk_image()
    maps = create_provider("otsu", {"polarity": polarity}).compute(image[None])
    found = maps[FOREGROUND][0] > 0.5
    assert _iou(found, disk) > 0.9
    assert maps[IMPORTANCE][0][found].min() == 1.0  # the lesion found is fully important
    assert maps[IMPORTANCE][0][disk].mean() > 0.95
    assert maps[IMPORTANCE][0][~disk].mean() < 0.2  # the skin hardly


def test_otsu_keeps_the_central_lesion_and_drops_a_dark_corner() -> None:
    image, disk = _disk_image(radius=9, centre=(24, 24))
    image[:6, :6] = 20  # a dark vignetting corner, as dermoscopes leave
    found = create_provider("otsu").compute(image[None])[FOREGROUND][0] > 0.5
    assert _iou(found, disk) > 0.85
    assert not found[:6, :6].any()


def test_saliency_marks_a_salient_square() -> None:
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    image[10:18, 14:22] = (250, 30, 30)
    for method in ("spectral_residual", "fine_grained"):
        importance = create_provider("saliency", {"method": method}).compute(image[None])[IMPORTANCE][0]
        inside = np.zeros((32, 32), dtype=bool)
        inside[8:20, 12:24] = True
        assert importance[inside].mean() > 2 * importance[~inside].mean(), method


def test_center_prior_peaks_in_the_middle_and_its_foreground_is_a_disk() -> None:
    maps = create_provider("center", {"sigma": 0.2}).compute(_random_images(2, 20))
    importance = maps[IMPORTANCE][0]
    assert np.allclose(importance, importance[::-1]) and np.allclose(importance, importance[:, ::-1])
    assert importance[9:11, 9:11].min() > 0.98 and importance[0, 0] < 0.01
    assert np.array_equal(maps[IMPORTANCE][0], maps[IMPORTANCE][1])  # the same for every image
    assert maps[FOREGROUND][0][10, 10] == 1 and maps[FOREGROUND][0][0, 0] == 0


@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpg.zip").is_file(), reason="needs ../shared/data")
def test_saliency_works_on_cifar10_images() -> None:
    with zipfile.ZipFile(SHARED_DATA / "cifar10-jpg.zip") as archive:
        names = sorted(name for name in archive.namelist() if name.lower().endswith(".jpg"))[::5001][:12]
        images = np.stack(
            [np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("RGB")) for name in names]
        )
    assert images.shape == (12, 32, 32, 3)
    for method in ("spectral_residual", "fine_grained"):
        maps = create_provider("saliency", {"method": method}).compute(images)
        importance, foreground = maps[IMPORTANCE], maps[FOREGROUND]
        assert importance.shape == foreground.shape == (12, 32, 32)
        assert importance.min() >= 0 and importance.max() <= 1
        assert (importance.reshape(12, -1).max(axis=1) == 1).all()  # min-max scaled per image
        share = foreground.reshape(12, -1).mean(axis=1)
        assert ((share > 0) & (share < 0.9)).all()  # a salient part, not all or nothing


# --- SAM ------------------------------------------------------------------------------------------


def _tiny_sam():
    """A randomly initialised SAM small enough for a test: 64-px input, 16-dim everything."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    dim, size, patch = 16, 64, 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=size,
            patch_size=patch,
            embed_dim=dim,
            depth=1,
            num_heads=2,
            out_chans=dim,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(size // patch, size // patch),
            input_image_size=(size, size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2),
            num_multimask_outputs=3,
            iou_head_depth=1,
            iou_head_hidden_dim=16,
        ),
    )


@pytest.fixture
def tiny_sam_checkpoint(tmp_path, monkeypatch):
    """A ``tiny-test`` model type in segment-anything's registry, built like the official ones:
    ``sam_model_registry["tiny-test"](checkpoint=PATH)`` loads the state dict at PATH."""
    import segment_anything

    path = tmp_path / "sam_tiny.pth"
    torch.save(_tiny_sam().state_dict(), path)

    def build(checkpoint=None):
        model = _tiny_sam()
        if checkpoint is not None:
            model.load_state_dict(torch.load(checkpoint, weights_only=True))
        return model.eval()

    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny-test", build)
    return path


@pytest.mark.parametrize("prompt", ["center", "box", "auto"])
def test_sam_runs_end_to_end_on_a_tiny_random_model(tiny_sam_checkpoint, prompt) -> None:
    options = {"checkpoint": str(tiny_sam_checkpoint), "model_type": "tiny-test", "prompt": prompt}
    provider = create_provider("sam", options)
    images = torch.from_numpy(_random_images(3, 24)).permute(0, 3, 1, 2)
    stored = compute_priors(provider, images)  # checks the contract, quantises to uint8
    assert {key: tuple(value.shape) for key, value in stored.items()} == {
        IMPORTANCE: (3, 24, 24),
        FOREGROUND: (3, 24, 24),
    }
    assert set(stored[FOREGROUND].unique().tolist()) <= {0, 255}
    assert provider.fingerprint()["checkpoint_bytes"] == tiny_sam_checkpoint.stat().st_size
    if prompt != "auto":  # a prompt always gives a mask: its probability is not constant
        assert stored[IMPORTANCE].float().std() > 0


def test_sam_without_a_checkpoint_names_the_option_and_the_official_weights(tmp_path) -> None:
    with pytest.raises(ConfigError) as error:
        create_provider("sam")
    message = str(error.value)
    assert "checkpoint=PATH" in message and "github.com/facebookresearch/segment-anything" in message
    assert "\n" not in message
    with pytest.raises(ConfigError, match="does not exist"):
        create_provider("sam", {"checkpoint": str(tmp_path / "missing.pth")})


def test_sam_with_a_wrong_checkpoint_fails_in_one_line(tiny_sam_checkpoint) -> None:
    provider = create_provider("sam", {"checkpoint": str(tiny_sam_checkpoint), "model_type": "vit_b"})
    with pytest.raises(ConfigError, match=r"could not load the SAM checkpoint .* model_type 'vit_b'"):
        provider.compute(_random_images(1))


# --- options and the contract -------------------------------------------------------------------


def test_defaults_given_explicitly_resolve_to_the_same_options() -> None:
    assert provider_options("otsu") == provider_options("otsu", {"polarity": "dark", "kernel": 0.1})
    assert provider_options("otsu", {"kernel": 0.2}) != provider_options("otsu")


def test_bad_names_and_options_are_user_errors() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown prior provider 'nosuch'\. .*Available: .*otsu"):
        create_provider("nosuch")
    with pytest.raises(PluginError, match="rejected its options"):
        create_provider("otsu", {"nope": 1})
    with pytest.raises(PluginError, match="polarity must be one of"):
        create_provider("otsu", {"polarity": "sideways"})
    with pytest.raises(PluginError, match="method must be one of"):
        create_provider("saliency", {"method": "magic"})


def test_a_provider_returning_bad_maps_is_named() -> None:
    class OutOfRange(PriorProvider):
        name = "out-of-range"

        def compute(self, images):
            return {IMPORTANCE: np.full(images.shape[:3], 2.0)}

    with pytest.raises(MalformedPriorError, match=r"'out-of-range' returned malformed maps: 'importance'"):
        compute_priors(OutOfRange(), torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


@pytest.mark.skipif(not (SHARED_DATA / "dermamnist.npz").is_file(), reason="needs ../shared/data")
def test_otsu_finds_a_central_lesion_in_real_dermamnist_images() -> None:
    with np.load(SHARED_DATA / "dermamnist.npz") as arrays:
        images = arrays["train_images"][:200]  # [200, 28, 28, 3] uint8
    foreground = create_provider("otsu").compute(images)[FOREGROUND]
    share = foreground.reshape(len(images), -1).mean(axis=1)
    # Measured on 2026-11-25: median lesion share 0.18, 98.5 % of images between 2 % and 95 %.
    assert 0.1 < float(np.median(share)) < 0.4
    assert ((share > 0.02) & (share < 0.95)).mean() > 0.95
    rows, cols = np.mgrid[0:28, 0:28]
    distance = np.hypot(rows - 13.5, cols - 13.5)
    spread = (foreground * distance).sum(axis=(1, 2)) / np.maximum(1, foreground.sum(axis=(1, 2)))
    assert float(np.median(spread)) < 8  # lesions sit near the centre (a uniform map gives ~10.5)
