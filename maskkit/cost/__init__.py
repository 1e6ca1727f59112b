"""``maskkit cost``: what a masking policy costs per pretrain step against ``random``, and where
an MLO iteration's time and FLOPs go, level by level; one concept per module.

- :mod:`.workload`: the run config sized for the measurement, synthetic data, and the
  ``Pretrainer`` as ``maskkit train`` builds it.
- Measurement: :mod:`.timing` (iterations, CUDA sync, CPU time), :mod:`.memory` (peak RSS or
  CUDA peak, the memory a policy needs at least), :mod:`.machine` (hardware, load),
  :mod:`.breakdown` (time and FLOPs by level and part from the engine's profiler labels).
- :mod:`.measure`: one policy, from its build to its row; :mod:`.baseline`: ``random`` and the
  "× random" ratio.
- Reporting: :mod:`.formatting`, :mod:`.tables`, :mod:`.report` (rich, Markdown, JSON).
- :mod:`.command`: the course of ``maskkit cost``.

``benchmarks/step_time.py`` (the project's performance harness: issue 8's reference workloads,
compared settings, matmul rates) is built on these modules.
"""
