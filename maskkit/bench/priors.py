"""The priors a suite's guided cells read, built once before the cells start.

Each distinct prior (provider, options, dataset, data, image size, subset, store) is looked up in
the priors store and built there when missing, by the same path ``maskkit train --build-priors``
takes (:func:`maskkit.engine.run.prepare`), so that cells running side by side never build the
same maps twice, and a problem with the data shows before any cell starts.
"""

from __future__ import annotations

import torch
from rich.console import Console

from maskkit.engine.priors import PriorSpec
from maskkit.engine.run import prepare

from .cells import Cell


def build_missing_priors(cells: list[Cell], console: Console) -> None:
    """Build every prior ``cells`` read that the store lacks (once per distinct prior)."""
    seen: set[str] = set()
    for cell in cells:
        if cell.config.prior is None:
            continue
        config = cell.config.model_copy(
            update={"data": cell.config.data.model_copy(update={"build_priors": True})}
        )
        identity = PriorSpec.from_config(config).command()  # names everything the maps depend on
        if identity in seen:
            continue
        seen.add(identity)
        console.print(f"priors for {cell.dataset}: {cell.config.prior} (store lookup, built if missing)")
        prepare(config, console, device=torch.device("cpu"))
