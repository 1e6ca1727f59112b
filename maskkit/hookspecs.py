"""pluggy hook specifications: what a maskkit plugin can provide.

A plugin is a module (or object) with functions marked ``@hookimpl`` and an entry point in the
``maskkit`` group of its distribution's ``pyproject.toml``::

    [project.entry-points.maskkit]
    my-policy = "my_package.my_module"

The built-in policies in ``plugins/`` are registered through exactly this path.
"""

from __future__ import annotations

import pluggy

from maskkit.policy import MaskPolicy

PROJECT_NAME = "maskkit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def maskkit_policies() -> list[type[MaskPolicy]]:
    """Return the :class:`~maskkit.policy.MaskPolicy` subclasses this plugin provides.

    Each class needs a unique ``name``; it is what ``maskkit train --policy NAME`` takes.
    """
