"""The k-NN classifier: the nearest pretrain features by cosine distance, votes weighted by
1 / distance."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize

from maskkit.report import classification_metrics

from .features import Features, accuracy, class_scores, standardised

#: Neighbour counts of the k-NN classifier, chosen on val (ascending: a tie goes to the smaller k).
KNN_K: tuple[int, ...] = (10, 20, 50)


def knn_probe(
    train: Features,
    val: Features,
    test: Features,
    class_names: list[str],
    k_grid: Sequence[int] = KNN_K,
) -> dict:
    """A distance-weighted k-NN classifier by cosine distance on frozen features, ``k`` chosen on
    ``val`` (values above the number of train features are left out), scored on ``test``.

    Returns:
        ``{"k": chosen k, "val_accuracy": {k: val accuracy}, "test": test metrics}``.
    """
    train, val, test = standardised(train, val, test)
    train, val, test = (Features(normalize(f.values), f.labels) for f in (train, val, test))
    grid = sorted({min(k, len(train.labels)) for k in k_grid})
    scores, models = {}, {}
    for k in grid:
        models[k] = KNeighborsClassifier(
            n_neighbors=k, metric="cosine", weights="distance", algorithm="brute"
        )
        models[k].fit(train.values, train.labels)
        scores[k] = accuracy(val.labels, models[k].predict(val.values))
    chosen = max(grid, key=lambda k: scores[k])
    probabilities = class_scores(models[chosen], test, len(class_names))
    return {
        "k": chosen,
        "val_accuracy": {str(k): scores[k] for k in grid},
        "test": classification_metrics(
            test.labels, models[chosen].predict(test.values), class_names, scores=probabilities
        ),
    }
