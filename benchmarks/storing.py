"""Storing results: one JSON file per finished (or failed) run, written atomically, and the table built from them.

A run's file appears complete or not at all (written to a temporary file in the same folder, then renamed with
``os.replace``), so an interrupted grid needs no repair: the next invocation skips the runs that have a file and
repeats the others. Parallel workers write different files, so they need no lock. ``results.csv`` (and
``failures.csv``), which the report reads, are rebuilt from the files whenever the table is written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .jobs import COLUMNS, FAILURE_COLUMNS, KEY_COLUMNS, Key, Row


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8", suffix=".tmp") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


class ResultStore:
    """Rows of finished runs as ``<folder>/<slug>.json``, one file each, keyed by :data:`~.jobs.KEY_COLUMNS`.

    Args:
        folder: where the row files live.
        columns: the fixed column set; a row with any other column is refused.
    """

    def __init__(self, folder: Path, columns: Sequence[str] = COLUMNS) -> None:
        self.folder = Path(folder)
        self.columns = tuple(columns)

    def add(self, slug: str, row: Row) -> Path:
        """Write ``row`` as ``<slug>.json`` (replacing an earlier attempt's); return the file."""
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"Row has columns outside the fixed set: {sorted(unknown)}")
        path = self.folder / f"{slug}.json"
        write_atomically(path, json.dumps({column: str(row.get(column, "")) for column in self.columns}, indent=1))
        return path

    def rows(self) -> list[Row]:
        """Every stored row, in file-name order (left-over temporary files of a crash are ignored)."""
        if not self.folder.is_dir():
            return []
        return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(self.folder.glob("*.json"))]

    def done_keys(self) -> set[Key]:
        """Keys of the stored runs."""
        return {tuple(row[column] for column in KEY_COLUMNS) for row in self.rows()}

    def write_table(self, path: Path) -> Path:
        """Write all rows as one CSV (header = the column set) atomically; return its path."""
        lines = [list(self.columns), *([row.get(column, "") for column in self.columns] for row in self.rows())]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(lines)
        write_atomically(Path(path), buffer.getvalue())
        return Path(path)


def result_stores(output: Path) -> tuple[ResultStore, ResultStore]:
    """The finished-run and failed-run stores of a results folder."""
    return ResultStore(output / "runs"), ResultStore(output / "failures", FAILURE_COLUMNS)
