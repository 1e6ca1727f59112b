"""The engine's calls into a masking policy: plugin code that raises ends in one line naming it.

The engine runs a policy's own code only inside :func:`plugin_code`: ``forward`` through
:func:`checked_decision` (which also checks the decision), the hooks through
:func:`checked_regularizer`, :func:`checked_pretrain_loss`, :func:`checked_set_progress` and
:func:`checked_statistics`. An exception raised there (a shape error in ``forward``, a
``KeyError`` in ``regularizer``, ...)
becomes a :class:`PolicyRaisedError`: the CLI prints it as one ``error:`` line with the policy,
its distribution and the plugin's line that raised, and exits with code 2. ``MASKKIT_DEBUG=1``
makes the CLI print the original traceback too.
"""

from __future__ import annotations

import contextlib
import inspect
import traceback
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

from maskkit.errors import MaskkitError, PluginError
from maskkit.policy import MaskBatch, MaskDecision, MaskPolicy, validate_decision

# How much of a plugin's exception message the one-line error keeps.
MAX_MESSAGE_CHARS = 300


class PolicyRaisedError(PluginError):
    """A policy's own code raised while the engine called it."""


def distribution_of(policy: MaskPolicy) -> str:
    """The distribution that installed ``policy``'s class, or its module when it is not registered."""
    from maskkit.plugins import get_registry

    info = get_registry().policies.get(getattr(policy, "name", ""))
    if info is not None and info.policy_class is type(policy):
        return info.distribution
    return f"module {type(policy).__module__}"


def _policy_source_files(policy: MaskPolicy) -> set[str]:
    """The files that define ``policy``'s class and its bases, maskkit's contract and torch aside."""
    files = set()
    for cls in type(policy).__mro__:
        if cls.__module__.startswith(("torch", "builtins", "abc", "maskkit.policy")):
            continue
        with contextlib.suppress(TypeError, OSError):
            source = inspect.getsourcefile(cls)
            if source is not None:
                files.add(str(Path(source).resolve()))
    return files


def raising_line(error: BaseException, policy: MaskPolicy) -> str | None:
    """``folder/file.py:LINE`` of the deepest frame of ``error`` inside the policy's own files."""
    files = _policy_source_files(policy)
    location = None
    for frame, line in traceback.walk_tb(error.__traceback__):
        path = Path(frame.f_code.co_filename)
        if str(path.resolve()) in files:
            location = f"{path.parent.name}/{path.name}:{line}"
    return location


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def plugin_code(policy: MaskPolicy, method: str) -> Iterator[None]:
    """Run a call into ``policy.<method>``; an exception it raises becomes a one-line
    :class:`PolicyRaisedError` (maskkit's own user errors pass through unchanged)."""
    try:
        yield
    except MaskkitError:
        raise
    except Exception as error:
        where = raising_line(error, policy)
        raise PolicyRaisedError(
            f"mask policy '{policy.name}' ({distribution_of(policy)}) raised in its {method}"
            + (f" at {where}" if where else "")
            + f": {_one_line(error)}. Fix the plugin or its policy_options, or pick another policy "
            "(MASKKIT_DEBUG=1 prints the traceback)"
        ) from error


def checked_decision(policy: MaskPolicy, batch: MaskBatch) -> MaskDecision:
    """``policy(batch)``, guarded by :func:`plugin_code` and checked by :func:`validate_decision`."""
    with plugin_code(policy, "forward"):
        decision = policy(batch)
    validate_decision(decision, batch, policy.name)
    return decision


def _scalar_or_none(policy: MaskPolicy, method: str, value: object) -> Tensor | None:
    """``value`` if it is a one-element tensor or None; else a one-line :class:`PluginError`."""
    if value is not None and not (isinstance(value, Tensor) and value.numel() == 1):
        shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise PluginError(
            f"mask policy '{policy.name}' ({distribution_of(policy)}) returned a {method} of "
            f"{shape}; return a scalar tensor (reduce it, e.g. with .mean()) or None"
        )
    return value


def checked_regularizer(policy: MaskPolicy, decision: MaskDecision, batch: MaskBatch) -> Tensor | None:
    """``policy.regularizer(decision, batch)``, guarded by :func:`plugin_code`; it must be a scalar
    tensor (the level-3 penalty) or None."""
    with plugin_code(policy, "regularizer"):
        penalty = policy.regularizer(decision, batch)
    return _scalar_or_none(policy, "regularizer", penalty)


def checked_pretrain_loss(
    policy: MaskPolicy, decision: MaskDecision, batch: MaskBatch, error: Tensor
) -> Tensor | None:
    """``policy.pretrain_loss(decision, batch, error)`` (``error``: ``[B, L]``), guarded by
    :func:`plugin_code`; it must be a scalar tensor (the policy's pretrain-level term) or None."""
    with plugin_code(policy, "pretrain_loss"):
        term = policy.pretrain_loss(decision, batch, error)
    return _scalar_or_none(policy, "pretrain_loss", term)


def checked_set_progress(policy: MaskPolicy, step: int, total_steps: int) -> None:
    """``policy.set_progress(step, total_steps)``, guarded by :func:`plugin_code`."""
    with plugin_code(policy, "set_progress"):
        policy.set_progress(step, total_steps)


def checked_statistics(policy: MaskPolicy) -> dict[str, float]:
    """``policy.statistics()``, guarded by :func:`plugin_code`: a dict of names to numbers
    (anything ``float()`` takes, a one-element tensor included), returned as floats."""
    with plugin_code(policy, "statistics"):
        statistics = policy.statistics()
    if not isinstance(statistics, dict):
        raise PluginError(
            f"mask policy '{policy.name}' ({distribution_of(policy)}) returned statistics of type "
            f"{type(statistics).__name__}; return a dict of names to numbers"
        )
    values = {}
    for key, value in statistics.items():
        try:
            values[str(key)] = float(value)
        except (TypeError, ValueError, RuntimeError):
            shape = f" of shape {list(value.shape)}" if isinstance(value, Tensor) else ""
            raise PluginError(
                f"mask policy '{policy.name}' ({distribution_of(policy)}) returned statistics['{key}'] "
                f"of type {type(value).__name__}{shape}; each statistic must be one number"
            ) from None
    return values
