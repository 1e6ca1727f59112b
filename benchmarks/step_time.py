"""Time one MLO iteration of stage 1 per masking policy, on synthetic data.

One *MLO iteration* is ``pretrain.mae.unroll_steps × pretrain.head.unroll_steps`` calls of
``Pretrainer.mlo.step`` (2 with the presets' 2/1/1 unroll). For a learnable policy (``mlo``,
``mlo-light``) it includes the finetune and mask steps and the mask level's hypergradient; for a
fixed one (``random``) it is the same number of plain MAE pretrain steps, so the ratio column is
the cost of MLO over random-mask MAE on the same model.

Reported per policy: median seconds per iteration and per pretrain step, the ratio to
``random``, images/s, FLOPs per iteration (``torch.utils.flop_counter``) and the achieved FLOP
rate (as a fraction of a measured dense-matmul rate), peak memory, parameter counts, the loss
evaluations per iteration by level and purpose, and the iteration's time and FLOPs broken down
by level and part (the engine's profiler labels). ``--unroll``, ``--darts-mode`` and
``--mask-every`` compare MLO settings in one invocation; ``--preset reference-cpu`` is issue 8's
reference configuration, printed beside the reference implementation's quoted figures.

    python benchmarks/step_time.py --preset cpu --policies random,mlo,mlo-light \\
        --iterations 5 --warmup 1 --markdown --json step_time.json
    python benchmarks/step_time.py --preset reference-cpu --unroll 1/1/1,2/1/1 --markdown

Nothing is read from or written to the repository: the data are random uint8 images and the
run directory is a temporary one. The code lives in ``benchmarks/steptime/``, on top of
``maskkit.cost`` (what ``maskkit cost`` measures with); see ``benchmarks/README.md`` for the
options and the columns.
"""

from __future__ import annotations

import sys

from steptime.main import main

if __name__ == "__main__":
    sys.exit(main())
