"""``maskkit export``: a run's ViT encoder in the formats other libraries load.

- ``timm``: ``model.safetensors`` and ``config.json`` that ``timm.create_model("local-dir:DIR",
  pretrained=True)`` loads (:mod:`maskkit.export.timm_format`).
- ``hf``: the same weights under Hugging Face ``transformers``' ViT names, with the
  ``config.json`` of ``ViTModel.from_pretrained(DIR)`` (:mod:`maskkit.export.hf_format`).

Either way only the encoder is exported (patch embedding, CLS token, position embeddings,
blocks, final norm): its CLS feature ``[B, D]`` equals maskkit's ``MaskedAutoencoderViT.features``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from maskkit.errors import ConfigError, UnknownNameError
from maskkit.export.encoder import ENCODER_CHECKPOINTS, RunEncoder, load_run_encoder
from maskkit.rundir import DIRECTORY_MODE, FILE_MODE


def _write_timm(encoder: RunEncoder, directory: Path) -> None:
    from maskkit.export.timm_format import write_timm

    write_timm(encoder, directory)


def _write_hf(encoder: RunEncoder, directory: Path) -> None:
    from maskkit.export.hf_format import write_hf

    write_hf(encoder, directory)


#: Export format → the function that writes an encoder into an (empty) directory.
FORMATS: dict[str, Callable[[RunEncoder, Path], None]] = {"timm": _write_timm, "hf": _write_hf}


def export_run(run_dir: Path, format: str, out: Path | None = None, checkpoint: str = "pretrained") -> Path:
    """Write the encoder of ``run_dir``'s ``checkpoint`` in ``format`` into ``out`` (default
    ``RUN_DIR/export/<format>``) and return ``out``.

    The files are written into a temporary folder beside ``out`` and renamed into place, so an
    export that fails leaves nothing behind; an ``out`` that already holds files is refused.
    """
    if format not in FORMATS:
        raise UnknownNameError("export format", format, list(FORMATS))
    encoder = load_run_encoder(run_dir, checkpoint)
    out = Path(out) if out is not None else encoder.run_dir / "export" / format
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already holds files; pick another --out, or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        FORMATS[format](encoder, staging)
        for file in staging.iterdir():
            file.chmod(FILE_MODE)  # safetensors writes 0600: every file of a run reads alike
        staging.chmod(DIRECTORY_MODE)  # mkdtemp makes it 0700
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


__all__ = ["ENCODER_CHECKPOINTS", "FORMATS", "RunEncoder", "export_run", "load_run_encoder"]
