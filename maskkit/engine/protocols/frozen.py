"""The protocols of a run's ``pretrained`` encoder: computed after stage 2, written to
``protocols.json``, repeated in ``summary.json`` and on the console."""

from __future__ import annotations

import time

from maskkit.checkpoint import load_checkpoint
from maskkit.engine.context import RunContext
from maskkit.models import MaskedAutoencoderViT

from .features import encoder_features
from .registry import PAIRED_PROTOCOLS, PROTOCOLS

#: The test metrics of each protocol that ``summary.json`` repeats.
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "auc", "weighted_f1", "macro_f1")


def frozen_encoder_protocols(context: RunContext) -> dict:
    """Every protocol of :data:`~maskkit.engine.protocols.registry.PROTOCOLS` on the run's
    ``pretrained`` encoder (a fresh MAE with those weights).

    Returns:
        ``{"linear_probe": ..., "knn": ..., "feature_dim": D, "splits": {name: N}, "seconds":
        wall time}``, JSON-serialisable (``protocols.json``).
    """
    started = time.perf_counter()
    config, splits, device = context.config, context.splits, context.device
    mae = MaskedAutoencoderViT(config.model).to(device)
    load_checkpoint(context.run.checkpoints, "pretrained", map_location=str(device)).load_into({"mae": mae})
    mae.eval()
    named = {"pretrain": splits.pretrain, "val": splits.eval, "test": splits.test}
    features = {
        name: encoder_features(
            mae.features,
            split,
            config.data.eval_batch_size,
            device,
            context.mean,
            context.std,
            context.autocast,
        )
        for name, split in named.items()
    }
    class_names = context.dataset.class_names
    arguments = (features["pretrain"], features["val"], features["test"], class_names)
    return {
        **{protocol.name: protocol.fit(*arguments) for protocol in PROTOCOLS},
        "feature_dim": int(features["test"].values.shape[1]),
        "splits": {name: len(split) for name, split in named.items()},
        "val_source": splits.eval_source,
        "seconds": round(time.perf_counter() - started, 2),
    }


def paired_protocols(context: RunContext) -> dict:
    """Every protocol of :data:`~maskkit.engine.protocols.registry.PAIRED_PROTOCOLS` that the run's
    config enables: ``{name: result}`` (for ``protocols.json``, beside the frozen-encoder ones)."""
    return {
        protocol.name: protocol.run(context)
        for protocol in PAIRED_PROTOCOLS
        if protocol.enabled(context.config)
    }


def protocols_summary(protocols: dict) -> dict[str, dict]:
    """What ``summary.json`` repeats of the protocols' results: each frozen-encoder protocol's
    :data:`SUMMARY_METRICS` on test, and each paired protocol's mean A − B per metric."""
    summary = {
        protocol.name: {key: protocols[protocol.name]["test"].get(key) for key in SUMMARY_METRICS}
        for protocol in PROTOCOLS
    }
    for paired in PAIRED_PROTOCOLS:
        if paired.name in protocols:
            found = protocols[paired.name]["metrics"]
            summary[paired.name] = {key: found[key]["mean"] for key in paired.metrics if key in found}
    return summary


def protocols_line(protocols: dict) -> str:
    """The run's console line: each protocol's test accuracy and the setting chosen on val,
    ``frozen pretrained encoder: linear probe test accuracy 0.5120 (C 0.1), k-NN 0.4830 (k 20)``."""
    parts = []
    for index, protocol in enumerate(PROTOCOLS):
        result = protocols[protocol.name]
        setting = result[protocol.setting]
        chosen = f"{setting:g}" if isinstance(setting, float) else str(setting)
        label = f"{protocol.short_title} test accuracy" if index == 0 else protocol.short_title
        parts.append(f"{label} {result['test']['accuracy']:.4f} ({protocol.setting} {chosen})")
    line = "frozen pretrained encoder: " + ", ".join(parts)
    for paired in PAIRED_PROTOCOLS:
        if paired.name in protocols:
            differences = []
            for key, title in paired.metrics.items():
                found = protocols[paired.name]["metrics"][key]
                low, high = found["ci95"]
                differences.append(f"{title} {found['mean']:+.4f} [{low:+.4f}, {high:+.4f}]")
            line += f"; {paired.short_title}: " + ", ".join(differences)
    return line
