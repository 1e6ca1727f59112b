"""Named benchmark workloads beyond maskkit's config presets: the configurations of issue 8.

A workload is a maskkit preset, a config layer over it (its model) and defaults for the command
line's options; what the command line gives wins (``--preset reference-cpu --batch-size 32`` is
the reference configuration at batch 32, ``--set model.depth=6`` its encoder at depth 6).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Issue 8's reference configuration: the model and batch at which the reference implementation
#: and maskkit were measured side by side on the 2-core development CPU.
REFERENCE_MODEL: dict[str, int] = {
    "img_size": 32,
    "patch_size": 2,
    "embed_dim": 192,
    "depth": 12,
    "num_heads": 3,
    "decoder_embed_dim": 128,
    "decoder_depth": 4,
    "decoder_num_heads": 4,
}
#: The paper's ViT-B/2 at 32 px with its 512×8 decoder (the ``paper`` preset's model).
VIT_B2_MODEL: dict[str, int] = {
    "img_size": 32,
    "patch_size": 2,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "decoder_embed_dim": 512,
    "decoder_depth": 8,
    "decoder_num_heads": 16,
}


@dataclass(frozen=True)
class Workload:
    """A named benchmark configuration.

    Attributes:
        name: the ``--preset`` value.
        description: one line for ``--help`` and the report's header.
        base_preset: the maskkit config preset it starts from (optimiser settings, weighting).
        config: a config layer over the preset and ``--config``, under ``--set``
            (``{"model": ...}``).
        options: defaults for the command line's options (attribute names of the parsed
            arguments: ``batch_size``, ``unroll``, ``threads``, ...).
    """

    name: str
    description: str
    base_preset: str
    config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def _reference_options() -> dict[str, Any]:
    return {
        "batch_size": 8,
        "unroll": "1/1/1",
        "policies": "random,mlo",
        "threads": 1,
        "device": "cpu",
        "precision": "fp32",
    }


WORKLOADS: dict[str, Workload] = {
    workload.name: workload
    for workload in (
        Workload(
            "reference-cpu",
            "issue 8's reference configuration: encoder 192×12 (3 heads), patch 2 at 32 px, decoder "
            "128×4, batch 8 at every level, unroll 1/1/1, policies random (the MAE baseline) and mlo "
            "(the reference masking MLP), one thread, fp32 on the CPU",
            "cpu",
            {"model": REFERENCE_MODEL},
            _reference_options(),
        ),
        Workload(
            "reference-cpu-vit-b",
            "reference-cpu with the paper's ViT-B/2 (768×12, decoder 512×8): issue 8's 'ViT-B/2, "
            "batch 8' figure",
            "cpu",
            {"model": VIT_B2_MODEL},
            _reference_options(),
        ),
    )
}
