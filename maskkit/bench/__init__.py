"""``maskkit bench``: compare masking policies fairly, over a grid of policies × datasets × seeds.

One concept per module:

- :mod:`~maskkit.bench.suite`: the suite file's schema and validation;
- :mod:`~maskkit.bench.layout`: where cells and outputs live under the output dir;
- :mod:`~maskkit.bench.cells`: the grid's cells, their configs, states and ``maskkit train`` commands;
- :mod:`~maskkit.bench.priors`: the guided cells' priors, built once up front;
- :mod:`~maskkit.bench.runner`: the pool that runs cells side by side, and stops them cleanly;
- :mod:`~maskkit.bench.attempt`: one attempt of a cell (``maskkit train`` started or resumed),
  the same on every executor;
- :mod:`~maskkit.bench.executors`: where the cells run: this machine, Slurm jobs, Ray actors;
- :mod:`~maskkit.bench.journal`: the record of invocations and attempts (wall times);
- :mod:`~maskkit.bench.aggregate`: results read back from the run dirs, and the statistics;
- :mod:`~maskkit.bench.comparisons`: each policy against the baseline, the premise (``random``
  against ``none``), and what the forest plot draws;
- :mod:`~maskkit.bench.power`: the minimum detectable effect of the paired t-test;
- :mod:`~maskkit.bench.report`: ``cells.csv``, ``results.md``, ``results.png`` and ``forest.png``;
- :mod:`~maskkit.bench.main`: the command itself.

The linear probe and k-NN protocols are part of a run (``protocols: true``,
:mod:`maskkit.engine.protocols`), so that a cell's process computes them on the data it has
loaded.
"""

from __future__ import annotations

import sys

#: How a cell runs ``maskkit``: this interpreter and the CLI module, read when a cell starts. (The
#: tests point it at their plugin-isolating wrapper, tests/isolated_cli.py.) Kept here, away from
#: the heavy modules, so that setting it costs no imports.
CELL_CLI: list[str] = [sys.executable, "-m", "maskkit.cli"]
