"""Progress bars that stay quiet when output is not a terminal (CI, pipes)."""

from __future__ import annotations

import os
import sys


def progress(iterable=None, *, total=None, desc=None, unit="it", disable=None):
    """A tqdm bar on stderr; disabled when stderr is not a TTY unless CELLVEC_PROGRESS=1."""
    from tqdm.auto import tqdm

    if disable is None:
        forced = os.environ.get("CELLVEC_PROGRESS")
        disable = (forced == "0") if forced is not None else not sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )
