"""``maskkit`` as the tests run it in a subprocess: the real CLI, with the plugin view isolated.

Run as ``python tests/isolated_cli.py ARGS``; it behaves as ``maskkit ARGS`` except that only
maskkit's own plugins and those installed under ``$MASKKIT_TEST_PLUGIN_SITES`` are found
(see ``plugin_isolation.py``).
"""

from __future__ import annotations

import sys

from plugin_isolation import isolate_entry_points, sites_from_environment

if __name__ == "__main__":
    isolate_entry_points(sites_from_environment())
    import maskkit.bench

    maskkit.bench.CELL_CLI[:] = [sys.executable, __file__]  # `maskkit bench`'s cells run isolated too
    from maskkit.cli import main

    sys.argv[0] = "maskkit"  # usage messages name the command as a user types it
    main()
