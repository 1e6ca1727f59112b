"""The suite's journal: one JSON line per invocation of ``maskkit bench`` and per cell attempt.

It is what the report's wall times come from. Records (each with ``time``, seconds since the
epoch, and ``invocation``, an id per ``maskkit bench`` process)::

    {"event": "start", "workers": 2, "threads": 1, "cells": 72}
    {"event": "cell", "cell": "dermamnist/mlo/seed-0", "exit_code": 0, "seconds": 812.4,
     "resumed": false, "log": "..."}
    {"event": "finish", "seconds": 6931.0, "outcome": "finished"}

An attempt that the bench stops (Ctrl-C, SIGTERM) is recorded with its exit code; one cut short
by ``kill -9`` of the bench itself is not, and an invocation killed that way counts until its
last record.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Journal:
    """Appends this invocation's records to ``path``."""

    path: Path
    invocation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def record(self, event: str, **fields: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(
            {"time": round(time.time(), 3), "invocation": self.invocation, "event": event, **fields}
        )
        with self.path.open("a") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Every whole record of the journal at ``path`` (none if it does not exist)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
    return records


@dataclass(frozen=True)
class Timings:
    """What the journal says about time.

    Attributes:
        cell_seconds: per cell key, the wall time of its recorded attempts, summed.
        attempts: per cell key, its recorded attempts in order.
        suite_seconds: the wall time of every invocation that ran cells, summed.
        invocations: how many invocations ran cells.
    """

    cell_seconds: dict[str, float]
    attempts: dict[str, list[dict[str, Any]]]
    suite_seconds: float
    invocations: int


def timings(records: list[dict[str, Any]]) -> Timings:
    """Sum the journal's records into :class:`Timings`."""
    attempts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    spans: dict[str, list[float]] = {}
    finished: dict[str, float] = {}
    for record in records:
        invocation = record.get("invocation", "")
        if record.get("event") == "start":
            spans[invocation] = [record["time"], record["time"]]
        elif invocation in spans:
            spans[invocation][1] = max(spans[invocation][1], record["time"])
        if record.get("event") == "cell":
            attempts[record["cell"]].append(record)
        elif record.get("event") == "finish" and invocation in spans:
            finished[invocation] = float(record["seconds"])
    suite = sum(finished.get(key, end - start) for key, (start, end) in spans.items())
    cell_seconds = {key: sum(float(item["seconds"]) for item in items) for key, items in attempts.items()}
    return Timings(cell_seconds, dict(attempts), suite, len(spans))
