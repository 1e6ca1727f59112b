"""The step-time benchmark behind ``benchmarks/step_time.py``, one concept per module.

- :mod:`.options`: the command line; :mod:`.workloads`: named workloads (issue 8's reference
  configuration); :mod:`.variants`: the MLO settings compared in one invocation.
- :mod:`.workload`: the run config, synthetic data and the ``Pretrainer`` as ``maskkit train``
  builds it.
- Measurement: :mod:`.timing` (iterations, CUDA sync, CPU time), :mod:`.memory` (peak RSS or
  CUDA peak), :mod:`.matmul_rate` (the dense matmul rate), :mod:`.machine` (hardware, load),
  :mod:`.runtime_setup` (threads, CPU tuning).
- :mod:`.breakdown`: time and FLOPs by level and part from the engine's profiler labels.
- :mod:`.runner`: one policy in one variant, in this process or a fresh one.
- :mod:`.reference`: issue 8's quoted reference figures and its goal.
- Reporting: :mod:`.formatting`, :mod:`.tables`, :mod:`.report` (rich, Markdown, JSON).
- :mod:`.main`: the course of a run.
"""
