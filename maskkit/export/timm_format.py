"""The ``timm`` export: ``model.safetensors`` + ``config.json`` for ``timm.create_model("local-dir:DIR")``.

maskkit's encoder is timm's ``VisionTransformer`` with a CLS token, position embeddings that
include the CLS row, pre-norm blocks with ``qkv_bias`` and LayerNorm ε = 1e-6, and a final norm;
its state dict already uses timm's names. The export builds that model with the run's sizes
(``model_args``: img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio; no
classifier, ``global_pool="token"``), loads the weights strictly (a missing or unexpected key
stops the export) and saves it with timm's own :func:`timm.models.save_for_hf`.

    model = timm.create_model("local-dir:runs/my-run/export/timm", pretrained=True)
    features = model.forward_features(images)[:, 0]   # [B, D], maskkit's CLS feature
"""

from __future__ import annotations

import json
from pathlib import Path

from maskkit.export.encoder import RunEncoder

#: The registered timm model the export names; every size is overridden by ``model_args``.
ARCHITECTURE = "vit_base_patch16_224"


def timm_model_args(encoder: RunEncoder) -> dict:
    """``timm.create_model`` keyword arguments of the run's encoder, without a classifier."""
    model = encoder.model
    return {
        "img_size": model.img_size,
        "patch_size": model.patch_size,
        "in_chans": model.in_chans,
        "embed_dim": model.embed_dim,
        "depth": model.depth,
        "num_heads": model.num_heads,
        "mlp_ratio": model.mlp_ratio,
        "num_classes": 0,
        "global_pool": "token",
    }


def write_timm(encoder: RunEncoder, directory: Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` of ``encoder`` into ``directory``."""
    import timm
    from timm.models import save_for_hf

    model = timm.create_model(ARCHITECTURE, pretrained=False, **timm_model_args(encoder))
    model.load_state_dict(encoder.weights, strict=True)
    data_config: dict = {"crop_pct": 1.0}
    if encoder.mean is not None and encoder.std is not None:
        data_config |= {"mean": encoder.mean, "std": encoder.std}
    save_for_hf(model, str(directory), safe_serialization=True, data_config=data_config)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    pretrained_cfg = config["pretrained_cfg"]
    pretrained_cfg.pop("license", None)  # the base architecture's, not these weights'
    pretrained_cfg["tag"] = f"maskkit-{encoder.config.policy}-{encoder.config.data.dataset}"
    config["maskkit"] = _provenance(encoder)
    config_file.write_text(json.dumps(config, indent=2))


def _provenance(encoder: RunEncoder) -> dict:
    """Where the weights come from, for a reader of ``config.json`` (timm ignores it)."""
    return {
        "run_dir": str(encoder.run_dir.resolve()),
        "checkpoint": encoder.checkpoint,
        "step": encoder.step,
        "policy": encoder.config.policy,
        "dataset": encoder.config.data.dataset,
        "normalisation": "the run's dataset statistics"
        if encoder.mean is not None
        else "unknown: normalise as the run did (its dataset's per-channel mean and std)",
    }
