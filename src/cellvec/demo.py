"""The demo: the whole pipeline on shipped data, offline, ending with a report.

PBMC 68k (reduced; 700 cells, 10 cell types) and the NCBI-format gene texts of its
genes ship in `data/` (see data/README.md). The demo builds the gene store with
the offline MiniLM model, builds a reference atlas from 70% of the cells
(stratified), refines it, maps the other 30% and writes a report.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cellvec.errors import CellvecError

log = logging.getLogger(__name__)

DEMO_FILES = ("pbmc68k_reduced.h5ad", "human_pbmc68k.gene_info.gz", "human_pbmc68k.gene2go.gz")
MIN_CONFIDENCE = 0.5


def shipped_data_dir() -> Path:
    """The repository's data/ folder (the demo runs from a source checkout)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "data" / DEMO_FILES[0]).exists():
            return parent / "data"
    raise CellvecError(
        "The demo data folder was not found; run from a cellvec checkout or pass --data DIR."
    )


def run_demo(
    out: str | Path, *, data_dir: str | Path | None = None, refine: str = "supcon", seed: int = 0
) -> dict:
    """Gene store, reference atlas (70% of the cells), mapping (the other 30%) and report
    into `out`; returns the summary also written to `out/summary.json`."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.mapping import map_cells
    from cellvec.cell_index.recipe import Recipe
    from cellvec.gene_store.store import build_gene_store

    t0 = time.perf_counter()
    data = _demo_data(data_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    steps = {}

    log.info("[1/5] gene store: embedding gene texts with the offline MiniLM model")
    with _timed(steps, "gene_store_s"):
        build_gene_store(
            data / DEMO_FILES[1],
            gene2go=data / DEMO_FILES[2],
            species="human",
            store=store,
            model="minilm",
        )

    ref, query = _split(data / DEMO_FILES[0], seed)

    log.info("[2/5] reference atlas from %d cells (refinement: %s)", ref.n_obs, refine)
    with _timed(steps, "atlas_s"):
        atlas = build_atlas(
            ref,
            store=store,
            name="pbmc68k",
            label_key="bulk_labels",
            recipe=Recipe(refine=refine),
            # held-out cells calibrate the typicality the report shows
            options=BuildOptions(calibration_split=0.1, seed=seed),
        )

    log.info("[3/5] mapping %d query cells", query.n_obs)
    with _timed(steps, "map_s"):
        res = map_cells(query, atlas, truth_key="bulk_labels", min_confidence=MIN_CONFIDENCE)
        res.write(out / "mapped.h5ad")
        res.write(out / "mapped.parquet")
        res.save(store, "demo")

    log.info("[4/5] report (UMAP, confusion matrix, per-class F1, confidence)")
    summary = {
        k: res.metrics[k]
        for k in ("accuracy", "macro_f1", "balanced_accuracy", "unassigned_fraction", "n_cells")
    }
    with _timed(steps, "report_s"):
        report = _report(out / "report", atlas, res, ref.n_obs, query.n_obs, dict(steps))
    summary.update(
        min_confidence=MIN_CONFIDENCE,
        report=str(report),
        seconds=time.perf_counter() - t0,
        steps=steps,
        store=str(store),
        mapped=str(out / "mapped.h5ad"),
    )
    (out / "summary.json").write_text(
        json.dumps({**summary, "per_class": res.metrics["per_class"]}, indent=2)
    )
    log.info("[5/5] done in %.0f s", summary["seconds"])
    return summary


def _demo_data(data_dir: str | Path | None) -> Path:
    """The folder of the demo's files (`data_dir`, or the checkout's data/), all present."""
    data = Path(data_dir) if data_dir else shipped_data_dir()
    missing = [f for f in DEMO_FILES if not (data / f).exists()]
    if missing:
        raise CellvecError(
            f"{data} lacks {', '.join(missing)}; regenerate with `python data/make_demo_data.py`."
        )
    return data


@contextmanager
def _timed(steps: dict, key: str):
    """Record the seconds the block took as `steps[key]`."""
    t = time.perf_counter()
    yield
    steps[key] = round(time.perf_counter() - t, 1)


def _split(path: Path, seed: int):
    """(reference, query): 70% / 30% of the cells, stratified by their labels."""
    from sklearn.model_selection import train_test_split

    from cellvec.cell_index.readers import read_expression

    src = read_expression(path)
    labels = src.obs["bulk_labels"].astype(str).to_numpy()
    idx = np.arange(src.n_obs)
    ref_idx, query_idx = train_test_split(idx, test_size=0.3, stratify=labels, random_state=seed)
    ref_mask = np.isin(idx, ref_idx)
    return src.subset(ref_mask), src.subset(~ref_mask)


def _report(folder: Path, atlas, res, n_ref: int, n_query: int, steps: dict) -> Path:
    """The HTML report of the mapping, with the run's sizes and `steps`' timings."""
    from cellvec.report import write_report

    return write_report(
        folder,
        ref_vectors=atlas.vectors,
        ref_labels=atlas.labels.astype(str),
        query_vectors=res.vectors,
        query_labels=res.labels.astype(str),
        confidence=res.confidence,
        recipe=atlas.recipe.to_dict(),
        metrics=res.metrics,
        min_confidence=MIN_CONFIDENCE,
        truth=res.truth,
        typicality=res.typicality,
        summary={
            "dataset": "PBMC 68k reduced (scanpy)",
            "reference cells": n_ref,
            "query cells": n_query,
            **steps,
        },
        title="cellvec demo: PBMC 68k (reduced) mapped onto a refined reference atlas",
    )
