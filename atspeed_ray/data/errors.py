"""The one error type for bad input data: it names the file and line when there is one."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data. ``str()`` reads ``FILE:LINE: message`` when a location is known."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        self.path = None if path is None else str(path)
        self.line = line
        self.message = message
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(where + message)
