"""``--logger csv``: ``RUN_DIR/metrics.csv``, the records of ``metrics.jsonl`` as a table.

One row per record, one column per key that any record has (``stage`` and ``step`` first, then
the others in the order they first appear), empty cells where a record lacks a key. A
spreadsheet opens it as it is. The file is rewritten whole through a temporary file and a rename
(:func:`maskkit.rundir.atomic_write_text`) at most every :data:`FLUSH_SECONDS` and when the run
ends, so a crash leaves the last complete table, never a half-written row; ``metrics.jsonl``
holds every record in any case. A resumed run starts from the records ``metrics.jsonl`` kept.
"""

from __future__ import annotations

import csv
import io
import json
import numbers
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from maskkit.rundir import atomic_write_text

if TYPE_CHECKING:
    from maskkit.config import RunConfig
    from maskkit.rundir import RunDir

CSV_FILE = "metrics.csv"
#: Seconds between two rewrites of the file while the run goes on.
FLUSH_SECONDS = 10.0
FIRST_COLUMNS = ("stage", "step")


def _cell(value: Any) -> Any:
    """A value as a cell: numbers and text as they are, anything else (lists, None) as JSON."""
    if isinstance(value, bool) or value is None or not isinstance(value, numbers.Real | str):
        return json.dumps(value)
    return value


def records_to_csv(records: Iterable[dict[str, Any]]) -> str:
    """CSV text of ``records``: a header of the union of their keys, then one row each."""
    records = list(records)
    keys = list(dict.fromkeys(key for record in records for key in record))
    columns = [key for key in FIRST_COLUMNS if key in keys] + [k for k in keys if k not in FIRST_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows({key: _cell(value) for key, value in record.items()} for record in records)
    return buffer.getvalue()


class CsvLogger:
    """Keeps the run's records and writes them to ``metrics.csv`` now and then, and at the end."""

    def __init__(
        self,
        run: RunDir,
        config: RunConfig | None = None,
        resume_position: tuple[str, int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = run.path / CSV_FILE
        self.clock = clock
        self.records = run.read_metrics()  # a resumed run's, cut back to its checkpoint already
        self.flushed_at: float | None = None
        if self.records:
            self.flush()

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))
        if self.flushed_at is None or self.clock() - self.flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Rewrite ``metrics.csv`` with every record so far (atomically)."""
        atomic_write_text(self.path, records_to_csv(self.records))
        self.flushed_at = self.clock()

    def close(self) -> None:
        self.flush()
