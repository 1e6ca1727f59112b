"""The ``hf`` export: the encoder under Hugging Face ``transformers``' ViT names.

``ViTModel.from_pretrained(DIR, add_pooling_layer=False)`` loads it (``transformers`` is an
optional extra: ``pip install 'maskkit[hf]'``; writing the export does not need it). The CLS
row of ``last_hidden_state`` (``[B, 1 + L, D]``) is maskkit's CLS feature.

Names, for block ``i`` (timm → transformers ``ViTModel``)::

    cls_token                   embeddings.cls_token
    pos_embed                   embeddings.position_embeddings
    patch_embed.proj.*          embeddings.patch_embeddings.projection.*
    blocks.i.norm1.*            encoder.layer.i.layernorm_before.*
    blocks.i.attn.qkv.*         encoder.layer.i.attention.attention.{query,key,value}.*  (split in 3)
    blocks.i.attn.proj.*        encoder.layer.i.attention.output.dense.*
    blocks.i.norm2.*            encoder.layer.i.layernorm_after.*
    blocks.i.mlp.fc1.*          encoder.layer.i.intermediate.dense.*
    blocks.i.mlp.fc2.*          encoder.layer.i.output.dense.*
    norm.*                      layernorm.*
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from maskkit.export.encoder import RunEncoder

if TYPE_CHECKING:
    from torch import Tensor

_EMBEDDINGS = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}


def hf_state_dict(weights: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """``weights`` (timm names) under ``ViTModel``'s names; the fused ``qkv`` ``[3D, D]`` (and
    bias ``[3D]``) split into query, key and value. Every key is used exactly once."""
    renamed = {new: weights[old] for old, new in _EMBEDDINGS.items()}
    used = set(_EMBEDDINGS)
    for i in range(depth):
        source, target = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for old, new in _BLOCK.items():
                renamed[f"{target}{new}.{kind}"] = weights[f"{source}{old}.{kind}"]
                used.add(f"{source}{old}.{kind}")
            query, key, value = weights[f"{source}attn.qkv.{kind}"].chunk(3, dim=0)
            for name, part in (("query", query), ("key", key), ("value", value)):
                renamed[f"{target}attention.attention.{name}.{kind}"] = part.contiguous()
            used.add(f"{source}attn.qkv.{kind}")
    if used != set(weights):
        raise ValueError(f"encoder keys with no transformers name: {sorted(set(weights) - used)}")
    return renamed


def hf_config(encoder: RunEncoder) -> dict:
    """The ``config.json`` of ``transformers``' ``ViTConfig`` for the run's encoder."""
    model = encoder.model
    return {
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": model.depth,
        "num_attention_heads": model.num_heads,
        "intermediate_size": int(model.embed_dim * model.mlp_ratio),
        "hidden_act": "gelu",  # timm's nn.GELU: the exact (erf) form
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6,
        "image_size": model.img_size,
        "patch_size": model.patch_size,
        "num_channels": model.in_chans,
        "qkv_bias": True,
        "torch_dtype": "float32",
    }


def write_hf(encoder: RunEncoder, directory: Path) -> None:
    """Write ``model.safetensors``, ``config.json`` and ``preprocessor_config.json`` (the run's
    normalisation, when known) of ``encoder`` into ``directory``."""
    from safetensors.torch import save_file

    tensors = hf_state_dict(encoder.weights, encoder.model.depth)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, directory / "model.safetensors", {"format": "pt"}
    )
    (directory / "config.json").write_text(json.dumps(hf_config(encoder), indent=2))
    if encoder.mean is not None and encoder.std is not None:
        size = encoder.model.img_size
        preprocessor = {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": size, "width": size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(encoder.mean),
            "image_std": list(encoder.std),
        }
        (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
