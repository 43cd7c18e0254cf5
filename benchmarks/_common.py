"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from cellvec._kernels import pinned


def _start_again_pinned() -> None:
    """Run this script again in a process whose numpy loads after cellvec's kernel pins
    (`cellvec/_kernels.py`): a script imports numpy first (its imports are sorted), and
    OpenBLAS reads the pins only as it loads. Once: never a loop."""
    if pinned() is False and not os.environ.get("CELLVEC_BENCH_PINNED"):
        os.environ["CELLVEC_BENCH_PINNED"] = "1"  # `import cellvec` set the pins themselves
        sys.stdout.flush()
        os.execv(sys.executable, sys.orig_argv)  # interpreter flags (-u, -X) kept


_start_again_pinned()  # every number in results/ on the same kernels on any machine

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# classes with fewer query cells than this are left out of `macro_f1_10`: one cell of a
# class of 3 called right or wrong moves a 9-class macro-F1 by up to 0.04
MIN_CELLS = 10


def rss_mib() -> float:
    """Current resident set size (MiB), from /proc."""
    with open(f"/proc/{os.getpid()}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timed(results: dict, key: str):
    t = time.perf_counter()
    yield
    results[key] = time.perf_counter() - t


def write_results(out: Path, stem: str, lines: list[str], data=None) -> None:
    """A benchmark's results: `out/stem.md` (the markdown `lines`, also printed) and, with
    `data`, `out/stem.json`."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    (out / f"{stem}.md").write_text(text + "\n")
    if data is not None:
        (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    print(text)


def macro_f1_10(per_class: dict) -> float:
    """Macro-F1 over the classes with at least `MIN_CELLS` query cells, from
    `classification_metrics`' `per_class` ({label: {"f1", "support", ...}})."""
    import numpy as np

    return round(
        float(np.mean([c["f1"] for c in per_class.values() if c["support"] >= MIN_CELLS])), 4
    )


def log_progress() -> None:
    """INFO logs with times on stderr (the runs are long), without the libraries' chatter."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "sentence_transformers", "lance", "lancedb", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def compare(ai, asim, ei, truth, codes, n_classes) -> dict:
    """Recall@k of neighbours `ai` against the exact `ei` (k = their width), and agreement
    of their voted labels with the exact vote `truth`."""
    from cellvec.cell_index.knn import vote

    recall = (ai[:, :, None] == ei[:, None, :]).any(2).sum(1).mean() / ei.shape[1]
    agree = (vote(ai, asim, codes, n_classes).argmax(1) == truth).mean()
    return {"recall_at_15": round(float(recall), 4), "label_agreement": round(float(agree), 4)}


def synthetic_h5ad_args(ap) -> None:
    """The size of the synthetic h5ad (`bench_cell_vectors.write_h5ad`) and its recipe:
    --cells x --genes with --nnz non-zeros per cell, --dim-d gene vectors, --top-genes."""
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--nnz", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--top-genes", type=int, default=200)
