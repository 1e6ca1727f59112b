"""The engine's calls into a masking policy: plugin code that raises ends in one line naming it.

:mod:`maskkit.engine.objectives` is the one module that calls a policy, and it does so only
inside :func:`plugin_code` (or through :func:`checked_decision`, which also checks the decision).
An exception raised there (a shape error in ``forward``, a ``KeyError`` in ``regularizer``, ...)
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


def checked_regularizer(policy: MaskPolicy, decision: MaskDecision, batch: MaskBatch) -> Tensor | None:
    """``policy.regularizer(decision, batch)``, guarded by :func:`plugin_code`; it must be a scalar
    tensor (the level-3 penalty) or None."""
    with plugin_code(policy, "regularizer"):
        penalty = policy.regularizer(decision, batch)
    if penalty is not None and not (isinstance(penalty, Tensor) and penalty.numel() == 1):
        shape = list(penalty.shape) if isinstance(penalty, Tensor) else type(penalty).__name__
        raise PluginError(
            f"mask policy '{policy.name}' ({distribution_of(policy)}) returned a regularizer of "
            f"{shape}; return a scalar tensor (reduce it, e.g. with .mean()) or None"
        )
    return penalty
