"""Evaluation protocols of the frozen pretrained encoder: a linear probe and a k-NN classifier.

They are the standard protocols of self-supervised papers, scored beside stage 2's end-to-end
fine-tuning (``protocols: true`` in a run's config; every cell of ``maskkit bench``). The encoder of
the run's ``pretrained`` checkpoint is frozen, and every image of the pretrain (all training
images), val and test splits is encoded once, without masking or augmentation, into the CLS
feature the classifier reads (:meth:`~maskkit.models.MaskedAutoencoderViT.features`). Each
protocol of :data:`PROTOCOLS` fits a classifier on the pretrain features:

- **linear probe** (:mod:`~maskkit.engine.protocols.linear_probe`): scikit-learn's multinomial
  ``LogisticRegression`` on standardised features (mean and scale of the pretrain features); its
  inverse regularisation ``C`` is chosen on val from :data:`LINEAR_PROBE_C`.
- **k-NN** (:mod:`~maskkit.engine.protocols.knn`): the ``k`` nearest pretrain features by cosine
  distance, on standardised and L2-normalised features, votes weighted by 1 / distance; ``k`` is
  chosen on val from :data:`KNN_K`.

Nothing is chosen on test: it is scored once, with the setting chosen on val. With ``pretrain.steps:
0`` the "pretrained" encoder is the freshly initialised one, so the protocols measure a random
encoder: the floor of a comparison.

A new protocol is one module with its fitting function and one entry in :data:`PROTOCOLS`
(:mod:`~maskkit.engine.protocols.registry`): the run, ``protocols.json``, ``summary.json`` and
``maskkit bench``'s report all iterate the registry. Its second kind, :data:`PAIRED_PROTOCOLS`,
compares the run's policy with ``random`` from the run's own checkpoint: the trial
(:mod:`~maskkit.engine.protocols.paired_trial`, ``trial.forks`` in the config).
"""

from __future__ import annotations

from .features import Features, class_scores, encoder_features
from .frozen import (
    SUMMARY_METRICS,
    frozen_encoder_protocols,
    paired_protocols,
    protocols_line,
    protocols_summary,
)
from .knn import KNN_K, knn_probe
from .linear_probe import LINEAR_PROBE_C, LINEAR_PROBE_MAX_ITER, linear_probe
from .registry import PAIRED_PROTOCOLS, PROTOCOLS, PairedProtocol, Protocol

__all__ = [
    "KNN_K",
    "LINEAR_PROBE_C",
    "LINEAR_PROBE_MAX_ITER",
    "PAIRED_PROTOCOLS",
    "PROTOCOLS",
    "SUMMARY_METRICS",
    "Features",
    "PairedProtocol",
    "Protocol",
    "class_scores",
    "encoder_features",
    "frozen_encoder_protocols",
    "knn_probe",
    "linear_probe",
    "paired_protocols",
    "protocols_line",
    "protocols_summary",
]
