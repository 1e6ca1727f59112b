"""The one registry of protocols: what the run computes and writes, and what ``maskkit bench``'s
report reads and titles.

Two kinds. A frozen-encoder protocol (:class:`Protocol`, :data:`PROTOCOLS`) scores the run's
pretrained encoder on test: a module with its fitting function (like :mod:`.knn`) and one entry.
A paired protocol (:class:`PairedProtocol`, :data:`PAIRED_PROTOCOLS`) compares the run's policy
with a baseline from the run's own checkpoint, and its result is a difference A − B on val (the
trial, :mod:`.paired_trial`). The run (``protocols.json``, the summary, its console line) and the
bench report (``cells.csv``, ``results.md``, the plots) iterate both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from maskkit.config import RunConfig
from maskkit.engine.context import RunContext

from .features import Features
from .knn import knn_probe
from .linear_probe import linear_probe
from .paired_trial import trial_enabled, trial_protocol


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol of the frozen pretrained encoder.

    Attributes:
        name: its key in ``protocols.json`` and in ``summary.json``'s ``protocols``, and the prefix
            of its metrics in ``maskkit bench``'s report (``<name>_<metric>``).
        title: its name in the report's full metric titles (``linear-probe AUC``).
        short_title: its name in tables, plots and the run's console line (``linear probe``).
        setting: the key of the hyper-parameter it chooses on val, in its result (``C``, ``k``).
        fit: ``(train, val, test features, class names) → result``, JSON-serialisable, with the
            chosen ``setting`` and the test metrics under ``test``.
        headline: the test metrics of it that the report's headline tables and plots show.
    """

    name: str
    title: str
    short_title: str
    setting: str
    fit: Callable[[Features, Features, Features, list[str]], dict]
    headline: tuple[str, ...]


#: Every protocol, in the order of ``protocols.json``, the console line and the report's columns.
PROTOCOLS: tuple[Protocol, ...] = (
    Protocol(
        name="linear_probe",
        title="linear-probe",
        short_title="linear probe",
        setting="C",
        fit=linear_probe,
        headline=("balanced_accuracy", "auc", "accuracy"),
    ),
    Protocol(
        name="knn", title="k-NN", short_title="k-NN", setting="k", fit=knn_probe, headline=("accuracy",)
    ),
)


@dataclass(frozen=True)
class PairedProtocol:
    """A protocol that compares the run's policy (A) with a baseline policy (B) from the very same
    checkpoint of the run, paired; its result is A − B, not a score of one encoder.

    Attributes:
        name: its key in ``protocols.json`` and in ``summary.json``'s ``protocols``, and the prefix
            of its metrics in ``maskkit bench``'s report (``<name>_<metric>``).
        title: its name in the report's headings and full metric titles.
        short_title: its name in tables and the run's console line.
        metrics: metric key in the result's ``metrics`` → its title (of the metric, not of the
            difference); each holds ``mean`` (of A − B) and ``ci95`` over the protocol's own repeats.
        lower_is_better: the metrics of :attr:`metrics` where a negative A − B favours A.
        in_points: the metrics of :attr:`metrics` that are fractions, shown in percentage points
            (the others are shown as they are).
        enabled: whether a run of this config computes it (given ``protocols: true``).
        run: ``context → result``, JSON-serialisable, with ``metrics`` as above.
    """

    name: str
    title: str
    short_title: str
    metrics: dict[str, str]
    lower_is_better: frozenset[str]
    in_points: frozenset[str]
    enabled: Callable[[RunConfig], bool]
    run: Callable[[RunContext], dict]


#: Every paired protocol, in the order of ``protocols.json`` and the report's sections.
PAIRED_PROTOCOLS: tuple[PairedProtocol, ...] = (
    PairedProtocol(
        name="trial",
        title="trial against `random`",
        short_title="trial",
        metrics={
            "balanced_accuracy": "val balanced accuracy",
            "val_cross_entropy": "val cross-entropy",
        },
        lower_is_better=frozenset({"val_cross_entropy"}),
        in_points=frozenset({"balanced_accuracy"}),
        enabled=trial_enabled,
        run=trial_protocol,
    ),
)
