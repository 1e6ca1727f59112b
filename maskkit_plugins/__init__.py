"""maskkit's built-in plugins (installed as the package ``maskkit_plugins``).

Each module registers through the ``maskkit`` entry-point group, exactly as a third-party
plugin does.
"""
