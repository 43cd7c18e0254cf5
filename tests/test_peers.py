"""The CellTypist peer: its file protocol (no peer environment needed) and one real run (slow)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import scipy.sparse as sp

from cellvec.errors import CellvecError
from cellvec.evaluation import _celltypist_runner as runner
from cellvec.evaluation import peers
from helpers import tiny_adata

# A stand-in for celltypist with the two calls the runner makes: nearest centroid on the
# genes the query shares with the model, so the protocol can be tested without the venv.
FAKE_CELLTYPIST = """
import numpy as np
import pandas as pd

__version__ = "fake"


class _Classifier:
    def __init__(self, features, classes, centroids):
        self.features, self.classes_, self.centroids = features, classes, centroids


class _Model:
    def __init__(self, classifier):
        self.classifier = classifier


class _Result:
    def __init__(self, labels):
        self.predicted_labels = pd.DataFrame({"predicted_labels": labels})


def train(adata, labels, check_expression=True, random_state=None, feature_selection=False):
    y = adata.obs[labels].astype(str).to_numpy()
    x = adata.X.toarray()
    classes = np.unique(y)
    centroids = np.stack([x[y == c].mean(0) for c in classes])
    return _Model(_Classifier(np.asarray(adata.var_names), classes, centroids))


def annotate(adata, model, majority_voting=False):
    c = model.classifier
    pos = {g: i for i, g in enumerate(c.features)}
    shared = [g for g in adata.var_names if g in pos]
    q = adata[:, shared].X.toarray()
    cent = c.centroids[:, [pos[g] for g in shared]]
    d = ((q[:, None, :] - cent[None]) ** 2).sum(-1)
    return _Result(c.classes_[d.argmin(1)])
"""


def _fake_python(tmp_path, module: str | None = FAKE_CELLTYPIST):
    """An executable that runs this python with a fake `celltypist` first on its path."""
    lib = tmp_path / "fakelib"
    lib.mkdir()
    if module is not None:
        (lib / "celltypist.py").write_text(textwrap.dedent(module))
    exe = tmp_path / "python"
    exe.write_text(f'#!/bin/sh\nPYTHONPATH="{lib}" exec "{sys.executable}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def _split():
    train, test = tiny_adata(90, counts=False), tiny_adata(60, seed=1, counts=False)
    return (
        train.X,
        train.obs["cell_type"].astype(str).to_numpy(),
        test.X,
        list(train.var_names),
        test.obs["cell_type"].astype(str).to_numpy(),
    )


def test_task_files_round_trip(tmp_path):
    x_tr, y_tr, x_te, genes, _ = _split()
    runner.write_task(
        tmp_path,
        x_tr,
        y_tr,
        x_te,
        genes,
        genes[:20],
        seed=3,
        train_options={"feature_selection": False},
    )
    a, b, task = runner.read_task(tmp_path)
    assert (a != sp.csr_matrix(x_tr)).nnz == 0 and (b != sp.csr_matrix(x_te)).nnz == 0
    assert task["labels"] == [str(v) for v in y_tr]
    assert task["train_genes"] == genes and task["test_genes"] == genes[:20]
    assert task["seed"] == 3 and task["train_options"] == {"feature_selection": False}


@pytest.mark.skipif(os.name == "nt", reason="the fake python is a shell script")
def test_protocol_end_to_end_with_fake_celltypist(tmp_path, monkeypatch):
    x_tr, y_tr, x_te, genes, y_te = _split()
    python = _fake_python(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the task dir must be gone after
    pred = peers.celltypist_predict(x_tr, y_tr, x_te, genes, python=python)
    assert pred.shape == (60,) and (pred == y_te).mean() == 1.0
    # a panel: the query has a third of the genes, in another order
    keep = np.arange(len(genes))[::-3]
    pred = peers.celltypist_predict(
        x_tr, y_tr, x_te[:, keep], genes, test_var_names=[genes[i] for i in keep], python=python
    )
    assert (pred == y_te).mean() == 1.0
    assert not list(tmp_path.glob("cellvec-celltypist-*"))


def test_missing_python_names_the_fix(tmp_path):
    x_tr, y_tr, x_te, genes, _ = _split()
    with pytest.raises(CellvecError, match="peer_env"):
        peers.celltypist_predict(x_tr, y_tr, x_te, genes, python=tmp_path / "no" / "python")


@pytest.mark.skipif(os.name == "nt", reason="the fake python is a shell script")
def test_python_without_celltypist_names_the_fix(tmp_path):
    x_tr, y_tr, x_te, genes, _ = _split()
    python = _fake_python(tmp_path, module=None)
    with pytest.raises(CellvecError, match=r"has no celltypist: use peer_env"):
        peers.celltypist_predict(x_tr, y_tr, x_te, genes, python=python)


def test_bad_inputs_are_refused_before_any_subprocess(tmp_path):
    x_tr, y_tr, x_te, genes, _ = _split()
    nowhere = tmp_path / "python"  # never reached: the checks come first
    with pytest.raises(CellvecError, match="labels"):
        peers.celltypist_predict(x_tr, y_tr[:-1], x_te, genes, python=nowhere)
    with pytest.raises(CellvecError, match="test_var_names"):
        peers.celltypist_predict(x_tr, y_tr, x_te[:, :5], genes, python=nowhere)
    with pytest.raises(CellvecError, match="shares no gene"):
        peers.celltypist_predict(
            x_tr, y_tr, x_te, genes, test_var_names=[f"X{i}" for i in range(30)], python=nowhere
        )


def test_env_location_follows_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(peers.ENV_VARIABLE, str(tmp_path / "venv"))
    assert peers.default_env_path() == tmp_path / "venv"
    monkeypatch.delenv(peers.ENV_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert peers.default_env_path() == tmp_path / "cache" / "cellvec" / "peers-venv"


@pytest.mark.skipif(os.name == "nt", reason="the failing python is a shell script")
def test_env_creation_failure_names_the_fix_and_leaves_nothing(tmp_path, monkeypatch):
    # a python whose venv module half-makes the directory, then fails (no ensurepip)
    broken = tmp_path / "python"
    broken.write_text('#!/bin/sh\nmkdir -p "$3/bin"; touch "$3/pyvenv.cfg"; exit 1\n')
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(peers.sys, "executable", str(broken))
    with pytest.raises(CellvecError, match=r"python -m venv .* pip install 'celltypist==1.7.1'"):
        peers.peer_env(tmp_path / "venv")
    assert not (tmp_path / "venv").exists()


def _pypi_reachable() -> bool:
    """Whether pip, with its own index settings, can see celltypist on the package index."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", "celltypist"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and peers.CELLTYPIST_VERSION in out.stdout


@pytest.mark.slow
def test_celltypist_separates_the_tiny_types():
    """The real CellTypist 1.7.1, in its own environment (created here on first use)."""
    env = peers.default_env_path()
    ready = peers._python_of(env).exists() and peers._satisfied(peers._python_of(env))
    if not ready and not _pypi_reachable():
        pytest.skip(f"PyPI is unreachable, so the CellTypist environment ({env}) cannot be made")
    x_tr, y_tr, x_te, genes, y_te = _split()
    first = peers.celltypist_predict(x_tr, y_tr, x_te, genes, seed=0)
    assert (first == y_te).mean() >= 0.95
    again = peers.celltypist_predict(x_tr, y_tr, x_te, genes, seed=0)
    assert (first == again).all()
