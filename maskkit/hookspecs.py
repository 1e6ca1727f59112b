"""pluggy hook specifications: what a maskkit plugin can provide.

A plugin is a module (or object) with functions marked ``@hookimpl`` and an entry point in the
``maskkit`` group of its distribution's ``pyproject.toml``::

    [project.entry-points.maskkit]
    my-policy = "my_package.my_module"

Two kinds of things can be provided: masking policies (:func:`maskkit_policies`) and prior
providers (:func:`maskkit_prior_providers`). The built-in ones in ``maskkit_plugins`` are
registered through exactly this path.
"""

from __future__ import annotations

import pluggy

from maskkit.policy import MaskPolicy
from maskkit.priors.provider import PriorProvider

PROJECT_NAME = "maskkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def maskkit_policies() -> list[type[MaskPolicy]]:
    """Return the :class:`~maskkit.policy.MaskPolicy` subclasses this plugin provides.

    Each class needs a unique ``name``; it is what ``maskkit train --policy NAME`` takes.
    """


@hookspec
def maskkit_prior_providers() -> list[type[PriorProvider]]:
    """Return the :class:`~maskkit.priors.provider.PriorProvider` subclasses this plugin provides.

    Each class needs a unique ``name``; it is what ``maskkit train --prior NAME`` and
    ``maskkit priors build --provider NAME`` take.
    """
