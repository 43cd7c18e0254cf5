"""Progress on long work: a tqdm bar on a terminal, log lines everywhere else.

A batch job, `nohup` or a scheduler writes stderr to a file, where a bar is noise
and no bar is silence: a gene-store build would say nothing for half an hour.
So when no bar is drawn, progress goes through `logging` instead (count, rate,
time left), at most every `LOG_INTERVAL` seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)

LOG_INTERVAL = 30.0  # seconds between progress log lines when no bar is drawn


def progress(iterable=None, *, total=None, desc=None, unit="it", disable=None):
    """A tqdm bar on stderr when it is a TTY (or CELLVEC_PROGRESS=1); otherwise, or with
    CELLVEC_PROGRESS=0 or `disable=True`, an object with the same methods that logs."""
    if disable is None:
        forced = os.environ.get("CELLVEC_PROGRESS")
        disable = (forced == "0") if forced is not None else not sys.stderr.isatty()
    if disable:
        return LogProgress(iterable, total=total, desc=desc, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class LogProgress:
    """The part of tqdm's interface cellvec uses (update, set_postfix, close, with, for),
    reporting through `logging` every `LOG_INTERVAL` seconds."""

    def __init__(self, iterable=None, *, total=None, desc=None, unit="it"):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc or "progress", unit
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def set_postfix(self, **kwargs):
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def update(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= LOG_INTERVAL:
            self.last = now
            self._log(now)

    def close(self):
        pass

    def _log(self, now: float):
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        parts = [f"{self.desc}: {self.n:,}"]
        if self.total:
            parts.append(f" of {self.total:,}")
        parts.append(f" {self.unit}s")
        if self.total:
            parts.append(f" ({100 * self.n / self.total:.0f}%)")
        parts.append(
            f", {rate:,.1f} {self.unit}s/s" if rate < 100 else f", {rate:,.0f} {self.unit}s/s"
        )
        if self.total and rate > 0:
            parts.append(f", about {_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(f" ({self.postfix})")
        log.info("%s", "".join(parts))
