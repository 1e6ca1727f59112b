"""``RUN_DIR/loggers.json``: which external run (W&B, MLflow) a run dir logs to.

A resumed run (``maskkit train --resume``) reads it and continues the same external run rather
than starting another.
"""

from __future__ import annotations

import json
from pathlib import Path

from maskkit.rundir import atomic_write_text

STATE_FILE = "loggers.json"


def read_logger_ids(run_path: Path) -> dict[str, str]:
    """Logger name → its external run id; empty for a new run (or an unreadable file)."""
    path = Path(run_path) / STATE_FILE
    try:
        loaded = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return {str(key): str(value) for key, value in loaded.items()} if isinstance(loaded, dict) else {}


def save_logger_id(run_path: Path, name: str, run_id: str) -> None:
    """Record ``name``'s external run id (written atomically, beside the others)."""
    ids = {**read_logger_ids(run_path), name: run_id}
    atomic_write_text(Path(run_path) / STATE_FILE, json.dumps(ids, indent=2, sort_keys=True))
