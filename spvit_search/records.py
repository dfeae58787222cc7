"""CSV rows appended durably as they are produced: a killed job keeps every row it reported.

Latency tables and training logs both resume from what is on disk, so a row counts only once
it is flushed and synced; a file that is new (or empty) gets its header first.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Sequence
from pathlib import Path


def append_csv_rows(path: Path, fields: Sequence[str], rows: Iterable[dict]) -> None:
    """Append ``rows`` (extra keys ignored) to the CSV at ``path``, creating folder and header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        fh.flush()
        os.fsync(fh.fileno())
