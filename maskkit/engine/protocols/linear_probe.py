"""The linear probe: a multinomial logistic regression on the frozen encoder's features."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from maskkit.report import classification_metrics

from .features import Features, accuracy, class_scores, standardised

#: Inverse regularisation strengths of the linear probe, chosen on val (ascending: a tie goes to
#: the stronger regularisation).
LINEAR_PROBE_C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
#: Iterations of the probe's solver (lbfgs) per value of C; each fit starts from the previous one.
LINEAR_PROBE_MAX_ITER = 1000


def linear_probe(
    train: Features,
    val: Features,
    test: Features,
    class_names: list[str],
    c_grid: Sequence[float] = LINEAR_PROBE_C,
) -> dict:
    """A linear classifier on frozen features, ``C`` chosen on ``val``, scored on ``test``.

    Returns:
        ``{"C": chosen C, "val_accuracy": {C: val accuracy}, "converged": bool, "test": the
        test metrics of :func:`~maskkit.report.classification_metrics`}``; the model scored on
        test is the one fitted on ``train`` with the chosen C.
    """
    train, val, test = standardised(train, val, test)
    grid = sorted(c_grid)
    # Each fit starts from the previous one's solution (warm start over ascending C).
    model = LogisticRegression(max_iter=LINEAR_PROBE_MAX_ITER, warm_start=True)
    scores, fitted, converged = {}, {}, {}
    for c in grid:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.set_params(C=c).fit(train.values, train.labels)
        scores[c] = accuracy(val.labels, model.predict(val.values))
        fitted[c] = (model.coef_.copy(), model.intercept_.copy())
        converged[c] = bool(np.all(model.n_iter_ < LINEAR_PROBE_MAX_ITER))
    chosen = max(grid, key=lambda c: scores[c])  # the first best: the strongest regularisation
    model.coef_, model.intercept_ = fitted[chosen]
    predictions = model.predict(test.values)
    probabilities = class_scores(model, test, len(class_names))
    return {
        "C": chosen,
        "val_accuracy": {str(c): scores[c] for c in grid},
        "converged": converged[chosen],
        "test": classification_metrics(test.labels, predictions, class_names, scores=probabilities),
    }
