"""Writing a file whole or not at all."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cellvec.errors import CellvecError


def check_folder(path: str | Path) -> Path:
    """`path` as a file that can be written, or an error saying what to change: its folder
    exists or can be made, and can be written to. Callers check before the work, so a
    mistyped output costs none of it."""
    path = Path(path)
    folder = path.parent
    while not folder.exists():  # ends at the current directory or the root
        folder = folder.parent
    if not folder.is_dir():
        raise CellvecError(
            f"{path}: {folder} is a file, so no folder can be made there; write the output "
            "into another folder."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CellvecError(
            f"{path}: the folder {folder} cannot be written to (permission denied); write "
            "the output into a folder of yours."
        )
    return path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A path beside `path` to write instead: renamed onto `path` when the block ends
    without an error (if it was written), removed whatever happens. A reader never sees a
    half-written file, a failed or interrupted write (Ctrl-C) leaves the old one and no
    temporary, and two writers of one file do not share a temporary name. The folder of
    `path` is made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if tmp.exists():
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
