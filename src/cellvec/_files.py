"""Writing a file whole or not at all."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A path beside `path` to write instead: renamed onto `path` when the block ends
    without an error (if it was written), removed whatever happens. A reader never sees a
    half-written file, a failed or interrupted write (Ctrl-C) leaves the old one and no
    temporary, and two writers of one file do not share a temporary name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if tmp.exists():
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
