"""The trial as a protocol: the run's policy against ``random`` from the run's own checkpoint.

With ``protocols: true`` and ``trial.forks`` above 0 (:class:`~maskkit.config.TrialProtocolConfig`),
a run that pretrained ends by ``maskkit trial``'s paired fork test (:mod:`maskkit.engine.trial`)
from its ``pretrained`` checkpoint (the end of stage 1): in each of ``forks`` forks, arm A takes
``steps`` plain pretrain steps masked by the run's policy (frozen, in the state its training left
it) and arm B the same steps from the same state on the same batches masked by ``random``; a
class-balanced linear probe scores both encoders on val. A − B over the forks, per metric, is
the result.

B's mask seed is 1 and A's 0 in every run, so a ``random`` run's trial (``random`` against
``random``) measures the instrument's noise floor by the very procedure every other policy's
trial follows. A run without stage 1 (``pretrain.steps: 0``, the bench's ``none``) has no
policy of its own to try, and is skipped.
"""

from __future__ import annotations

from typing import Any

from maskkit.config import RunConfig
from maskkit.engine.context import RunContext

#: The baseline arm's policy and mask seed (A's mask seed is 0).
BASELINE_POLICY = "random"
BASELINE_MASK_SEED = 1
#: The checkpoint both arms start from: the end of stage 1.
START_POINTER = "pretrained"


def trial_enabled(config: RunConfig) -> bool:
    """Whether the run tries its policy: ``trial.forks`` set and a stage 1 to start from."""
    return config.trial.forks > 0 and config.pretrain.steps != 0


def trial_protocol(context: RunContext) -> dict[str, Any]:
    """Run the trial of the run's policy against ``random`` from its ``pretrained`` checkpoint.

    Returns:
        ``maskkit trial --json``'s result: ``settings``, ``starting_encoder``, ``metrics``
        (metric → ``{"mean", "ci95", "per_fork", "a", "b", ...}`` of A − B over the forks, on val)
        and ``cost``.
    """
    # Imported here: the trial opens runs through maskkit.engine.run, which imports this package.
    from maskkit.engine.trial import ArmSpec, RunSource, TrialSettings, run_trial

    config = context.config
    settings = TrialSettings(
        source=RunSource(context.run.path, START_POINTER),
        arm_a=ArmSpec(config.policy),
        arm_b=ArmSpec(BASELINE_POLICY, mask_seed=BASELINE_MASK_SEED),
        forks=config.trial.forks,
        steps=config.trial.steps,
        probe_images=config.trial.probe_images,
        seed=config.seed,
        lr=config.trial.lr,
        lr_schedule=config.trial.lr_schedule,
        device=str(context.device),
    )
    return run_trial(settings, context.console)
