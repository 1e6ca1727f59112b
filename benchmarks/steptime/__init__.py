"""The step-time harness behind ``benchmarks/step_time.py``, one concept per module, on top of
:mod:`maskkit.cost` (the config and ``Pretrainer`` as ``maskkit train`` builds them, timing,
memory, the breakdown, the step-time, cost and breakdown tables: what ``maskkit cost`` uses too).

- :mod:`.options`: the command line; :mod:`.workloads`: named workloads (issue 8's reference
  configuration); :mod:`.variants`: the MLO settings compared in one invocation.
- :mod:`.workload`: the run config of one policy in one variant, and its images.
- Measurement: :mod:`.matmul_rate` (the dense matmul rate), :mod:`.peak` (datasheet peaks for
  the MFU), :mod:`.runtime_setup` (threads, CPU tuning on or off).
- :mod:`.runner`: one policy in one variant, in this process or a fresh one;
  :mod:`.interleaved`: a policy's settings side by side; :mod:`.learned_mask_cost`: the
  learned-mask work per call.
- :mod:`.reference`: issue 8's quoted reference figures and its goal.
- Reporting: :mod:`.tables` (the harness's own tables), :mod:`.report` (its header, rich and
  Markdown).
- :mod:`.main`: the course of a run.
"""
