"""The encoder of a run's checkpoint, as the exporters read it: its model config and weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from maskkit.checkpoint import checkpoint_path, load_checkpoint
from maskkit.config import ModelConfig, RunConfig, load_run_config
from maskkit.errors import ConfigError, MaskkitError, UnknownNameError
from maskkit.rundir import RunDir

if TYPE_CHECKING:
    from torch import Tensor

#: The checkpoints whose encoder can be exported: the end of pretraining (stage 1, the default)
#: and the end of fine-tuning (stage 2; its classifier head is not exported).
ENCODER_CHECKPOINTS = ("pretrained", "final")
#: Keys of the MAE's state dict that belong to its decoder, not to the encoder.
_DECODER_PREFIXES = ("decoder_", "mask_token")


@dataclass(frozen=True)
class RunEncoder:
    """A run's ViT encoder.

    Attributes:
        run_dir: the run it comes from.
        checkpoint: the pointer it was read from (``pretrained`` or ``final``).
        step: the checkpoint's global step.
        config: the run's config (``config.model`` is the architecture).
        weights: the encoder's tensors under timm ``VisionTransformer`` names: ``cls_token``
            ``[1, 1, D]``, ``pos_embed`` ``[1, 1 + L, D]`` (CLS row first), ``patch_embed.proj.*``,
            ``blocks.<i>.*``, ``norm.*``.
        mean, std: the per-channel statistics the run normalised its ``[0, 1]`` images with (its
            dataset's train images), or None when the dataset could not be read.
    """

    run_dir: Path
    checkpoint: str
    step: int | None
    config: RunConfig
    weights: dict[str, Tensor] = field(repr=False)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def model(self) -> ModelConfig:
        return self.config.model


def load_run_encoder(run_dir: Path, checkpoint: str = "pretrained") -> RunEncoder:
    """The encoder of ``run_dir``'s ``checkpoint``.

    Raises:
        ConfigError: ``run_dir`` is no run dir, or the run has not reached ``checkpoint`` yet.
        DamagedFileError: a file of the checkpoint does not read back.
    """
    if checkpoint not in ENCODER_CHECKPOINTS:
        raise UnknownNameError("checkpoint", checkpoint, list(ENCODER_CHECKPOINTS))
    if not Path(run_dir).is_dir():
        raise ConfigError(f"run dir {run_dir} does not exist")
    run = RunDir.open(run_dir)
    config = load_run_config(run.config_path)
    if checkpoint_path(run.checkpoints, checkpoint) is None:
        stage = "pretraining" if checkpoint == "pretrained" else "fine-tuning"
        raise ConfigError(
            f"{run.path} has no finished encoder yet (no '{checkpoint}' checkpoint: {stage} has not "
            f"ended); finish the run first (maskkit train --resume {run.path})"
        )
    loaded = load_checkpoint(run.checkpoints, checkpoint)
    if "mae" not in loaded.weights:
        raise ConfigError(
            f"the '{checkpoint}' checkpoint of {run.path} holds no encoder (no mae.safetensors)"
        )
    weights = {
        key: value for key, value in loaded.weights["mae"].items() if not key.startswith(_DECODER_PREFIXES)
    }
    mean, std = _normalisation(config)
    return RunEncoder(run.path, checkpoint, loaded.state.get("step"), config, weights, mean, std)


def _normalisation(config: RunConfig) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """The mean and std the run normalised with (those of its dataset's train images at its
    resolution), read from the data without downloading; (None, None) when it is not there."""
    from maskkit.data import default_data_dir, load_dataset

    try:
        dataset = load_dataset(
            config.data.dataset,
            config.data.data_dir or default_data_dir(),
            image_size=config.model.img_size,
            download=False,
        )
    except MaskkitError:
        return None, None
    return tuple(float(v) for v in dataset.mean), tuple(float(v) for v in dataset.std)
