"""Peer-side runner: train CellTypist on one task directory and write its predictions.

Run by the peer environment's python (`cellvec.evaluation.peers.peer_env`) as a file,
`python _celltypist_runner.py TASK_DIR`, so it imports only celltypist, anndata, numpy,
scipy and pandas, never cellvec (the peer environment does not have it).

The protocol, all in TASK_DIR:
  in   train.npz, test.npz   log-normalised (CP10k + log1p) cells x genes, scipy CSR
  in   task.json            {"train_genes", "test_genes", "labels", "seed", "train_options"}
  out  result.json          {"labels", "n_features_used", "train_seconds", "predict_seconds",
                             "celltypist_version", "sklearn_version"}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

TASK, RESULT = "task.json", "result.json"


def write_task(
    task_dir: Path,
    x_train,
    y_train,
    x_test,
    train_genes,
    test_genes,
    *,
    seed: int,
    train_options: dict,
) -> None:
    """Write one task (the caller's side of the protocol)."""
    task_dir = Path(task_dir)
    sp.save_npz(task_dir / "train.npz", sp.csr_matrix(x_train, dtype=np.float32))
    sp.save_npz(task_dir / "test.npz", sp.csr_matrix(x_test, dtype=np.float32))
    task = {
        "train_genes": [str(g) for g in train_genes],
        "test_genes": [str(g) for g in test_genes],
        "labels": [str(v) for v in y_train],
        "seed": int(seed),
        "train_options": dict(train_options),
    }
    (task_dir / TASK).write_text(json.dumps(task))


def read_task(task_dir: Path) -> tuple[sp.csr_matrix, sp.csr_matrix, dict]:
    """(train matrix, test matrix, task dict) as written by `write_task`."""
    task_dir = Path(task_dir)
    task = json.loads((task_dir / TASK).read_text())
    x_train = sp.load_npz(task_dir / "train.npz").tocsr()
    x_test = sp.load_npz(task_dir / "test.npz").tocsr()
    return x_train, x_test, task


def run(task_dir: Path) -> dict:
    """Train with `celltypist.train`, predict with `celltypist.annotate` (best match, no voting)."""
    import anndata as ad
    import celltypist
    import pandas as pd
    import sklearn

    x_train, x_test, task = read_task(task_dir)
    np.random.seed(task["seed"])  # mini-batch SGD samples cells with np.random
    train = ad.AnnData(
        x_train,
        obs=pd.DataFrame({"label": pd.Categorical(task["labels"])}),
        var=pd.DataFrame(index=pd.Index(task["train_genes"], dtype=str)),
    )
    t0 = time.perf_counter()
    model = celltypist.train(
        train,
        labels="label",
        check_expression=False,
        random_state=task["seed"],
        **task["train_options"],
    )
    train_seconds = time.perf_counter() - t0
    test = ad.AnnData(
        x_test,
        obs=pd.DataFrame(index=pd.Index([f"q{i}" for i in range(x_test.shape[0])], dtype=str)),
        var=pd.DataFrame(index=pd.Index(task["test_genes"], dtype=str)),
    )
    t0 = time.perf_counter()
    result = celltypist.annotate(test, model=model, majority_voting=False)
    predict_seconds = time.perf_counter() - t0
    used = int(np.isin(task["test_genes"], model.classifier.features).sum())
    out = {
        "labels": result.predicted_labels["predicted_labels"].astype(str).tolist(),
        "n_features_used": used,
        "n_model_features": int(len(model.classifier.features)),
        "train_seconds": train_seconds,
        "predict_seconds": predict_seconds,
        "celltypist_version": celltypist.__version__,
        "sklearn_version": sklearn.__version__,
    }
    (Path(task_dir) / RESULT).write_text(json.dumps(out))
    return out


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", FutureWarning)  # scanpy/sklearn deprecations, not ours
    run(Path(sys.argv[1]))
