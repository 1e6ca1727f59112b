"""``python -m maskkit``: the command line, as torchrun starts it (``torchrun ... -m maskkit train``)."""

from maskkit.cli import main

main()
