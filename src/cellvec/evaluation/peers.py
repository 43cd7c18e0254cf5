"""Real peers run as their authors ship them, on the same cells and folds as cellvec.

CellTypist 1.7.1 needs scikit-learn < 1.7 (it passes `multi_class` to
LogisticRegression, which scikit-learn 1.8 removed), so it cannot share cellvec's
environment. `peer_env()` makes a separate virtual environment for it on first use
(pip, from PyPI) and reuses it after; `celltypist_predict()` runs CellTypist there in
a subprocess, passing the cells through files in a temporary directory.
CellTypist's model download (`models.download_models`) is never called: each model is
trained here, on the reference cells given.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cellvec.errors import CellvecError
from cellvec.evaluation import _celltypist_runner as runner

log = logging.getLogger(__name__)

CELLTYPIST_VERSION = "1.7.1"
REQUIREMENTS = (f"celltypist=={CELLTYPIST_VERSION}", "scikit-learn<1.7")
ENV_VARIABLE = "CELLVEC_PEERS_VENV"
RUNNER = Path(__file__).with_name("_celltypist_runner.py")

_CHECK = (
    "import importlib.metadata as m, json; "
    "print(json.dumps({p: m.version(p) for p in ('celltypist', 'scikit-learn')}))"
)


def default_env_path() -> Path:
    """$CELLVEC_PEERS_VENV, else $XDG_CACHE_HOME/cellvec/peers-venv (~/.cache by default)."""
    if os.environ.get(ENV_VARIABLE):
        return Path(os.environ[ENV_VARIABLE]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return cache / "cellvec" / "peers-venv"


def _python_of(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _clean_env() -> dict[str, str]:
    """The environment for peer subprocesses: without PYTHONPATH/PYTHONHOME, which would
    put cellvec's packages (scikit-learn >= 1.8 among them) ahead of the peer's own."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _satisfied(python: Path) -> bool:
    """True when `python` has celltypist 1.7.1 and scikit-learn < 1.7 (no heavy import)."""
    try:
        out = subprocess.run(
            [str(python), "-c", _CHECK],
            capture_output=True,
            text=True,
            timeout=60,
            env=_clean_env(),
        )
        versions = json.loads(out.stdout) if out.returncode == 0 else {}
    except (OSError, subprocess.SubprocessError, ValueError):
        return False
    if versions.get("celltypist") != CELLTYPIST_VERSION:
        return False
    major_minor = tuple(int(p) for p in versions.get("scikit-learn", "99").split(".")[:2])
    return major_minor < (1, 7)


def _run_step(cmd: list[str], what: str, fix: str) -> None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env())
    except OSError as e:
        raise CellvecError(f"{what} failed ({e}). {fix}") from e
    if out.returncode != 0:
        tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-8:])
        raise CellvecError(f"{what} failed (exit {out.returncode}):\n{tail}\n{fix}")


@contextmanager
def _creation_lock(env: Path):
    """One process at a time creates or installs into `env` (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(env.parent / f".{env.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def peer_env(path: str | Path | None = None) -> Path:
    """The python of a virtual environment holding celltypist==1.7.1 and scikit-learn<1.7.

    `path` is the environment's directory (default: `default_env_path()`). It is created
    on first use (`python -m venv`, then `pip install` from PyPI: a minute or two, logged)
    and reused after; an existing environment missing the packages gets them installed.
    """
    env = Path(path).expanduser() if path is not None else default_env_path()
    python = _python_of(env)
    if python.exists() and _satisfied(python):
        log.debug("CellTypist peer environment: %s", env)
        return python
    manual = (
        f"To make it by hand: python -m venv {env} && {python} -m pip install "
        + " ".join(f"'{r}'" for r in REQUIREMENTS)
        + f" (or point ${ENV_VARIABLE} at an environment that has them)."
    )
    t0 = time.perf_counter()
    env.parent.mkdir(parents=True, exist_ok=True)
    with _creation_lock(env):
        if python.exists() and _satisfied(python):  # made meanwhile by another process
            return python
        if not python.exists():
            log.info("Creating the CellTypist peer environment at %s (once; a minute or two)", env)
            fresh = not env.exists()
            try:
                _run_step(
                    [sys.executable, "-m", "venv", str(env)],
                    f"Creating a virtual environment at {env}",
                    "Python's venv module is needed (on Debian/Ubuntu: apt install python3-venv). "
                    + manual,
                )
            except CellvecError:
                if fresh:  # leave no half-made environment behind
                    shutil.rmtree(env, ignore_errors=True)
                raise
        log.info("Installing %s into %s from PyPI", ", ".join(REQUIREMENTS), env)
        _run_step(
            [str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
            f"Installing {', '.join(REQUIREMENTS)} into {env}",
            "PyPI must be reachable (check the network or pip's index settings). " + manual,
        )
        if not _satisfied(python):
            raise CellvecError(
                f"{env}: pip finished but celltypist {CELLTYPIST_VERSION} with scikit-learn < 1.7 "
                f"is still not importable there. Remove {env} and run again. " + manual
            )
    log.info("CellTypist peer environment ready in %.0f s: %s", time.perf_counter() - t0, env)
    return python


def celltypist_predict(
    x_train,
    y_train,
    x_test,
    var_names,
    *,
    test_var_names=None,
    seed: int = 0,
    feature_selection: bool = False,
    python: str | Path | None = None,
) -> np.ndarray:
    """CellTypist's labels for the `x_test` cells, trained on (`x_train`, `y_train`).

    Inputs are log-normalised (CP10k + log1p, as cellvec's readers give) cells x genes,
    which is what CellTypist expects. The call is CellTypist's default training and its
    best-match labels, as a user would run it:
    `celltypist.train(adata, labels, check_expression=False, random_state=seed)` (a one-vs-rest
    LogisticRegression on standardised genes, lbfgs, C=1; `feature_selection=True` adds its
    two-pass SGD gene selection), then `celltypist.annotate(query, model,
    majority_voting=False).predicted_labels`. `check_expression=False` because CellTypist's
    check wants the first cell to sum to 10,000 over the genes given, which a gene panel or
    a file of highly variable genes never does, although its values are CP10k + log1p.

    `var_names` names the columns of `x_train` (and of `x_test` unless `test_var_names`
    is given). With `test_var_names` the query may have fewer or other genes than the
    reference (a panel): CellTypist then predicts from the genes the two share, its own
    way (it keeps the model's coefficients and scaling for the shared genes only; query
    genes the model lacks are ignored), and never sees cellvec's gene matching.
    Deterministic for a fixed `seed`. `python`: the peer environment's python (default:
    `peer_env()`, which creates it on first use).
    """
    var_names = [str(g) for g in var_names]
    test_var_names = var_names if test_var_names is None else [str(g) for g in test_var_names]
    y_train = np.asarray(y_train)
    _check_inputs(x_train, y_train, x_test, var_names, test_var_names)
    python = _peer_python(python)
    t0 = time.perf_counter()
    result = _run_celltypist(
        python,
        x_train,
        y_train,
        x_test,
        var_names,
        test_var_names,
        seed=seed,
        train_options={"feature_selection": bool(feature_selection)},
    )
    log.info(
        "CellTypist %s: %d reference cells, %d query cells, %d features used; "
        "train %.1f s, predict %.1f s, %.1f s in all",
        result["celltypist_version"],
        x_train.shape[0],
        x_test.shape[0],
        result["n_features_used"],
        result["train_seconds"],
        result["predict_seconds"],
        time.perf_counter() - t0,
    )
    labels = np.asarray(result["labels"], dtype=object)
    if len(labels) != x_test.shape[0]:
        raise CellvecError(
            f"CellTypist returned {len(labels):,} labels for {x_test.shape[0]:,} query cells."
        )
    return labels


def _check_inputs(x_train, y_train, x_test, var_names: list[str], test_var_names: list[str]):
    """Refuse labels or gene names that do not fit the matrices, and a query sharing no
    gene with the reference."""
    if x_train.shape[0] != len(y_train):
        raise CellvecError(
            f"celltypist_predict: {x_train.shape[0]:,} training cells but {len(y_train):,} labels."
        )
    if x_train.shape[1] != len(var_names) or x_test.shape[1] != len(test_var_names):
        raise CellvecError(
            f"celltypist_predict: gene names do not match the matrices ({x_train.shape[1]:,} "
            f"reference columns for {len(var_names):,} names, {x_test.shape[1]:,} query columns "
            f"for {len(test_var_names):,}); pass test_var_names when the query's genes differ."
        )
    if not set(test_var_names) & set(var_names):
        raise CellvecError(
            "celltypist_predict: the query shares no gene with the reference; "
            "use the same gene naming (symbols) in both."
        )


def _peer_python(python: str | Path | None) -> Path:
    """The peer environment's python: `python`, or `peer_env()`'s (made on first use)."""
    python = Path(python) if python is not None else peer_env()
    if not python.exists():
        raise CellvecError(
            f"{python}: no such python for the CellTypist peer. Call "
            "cellvec.evaluation.peers.peer_env() to create the environment, or pass the python "
            f"of one holding {' and '.join(REQUIREMENTS)}."
        )
    return python


def _run_celltypist(python: Path, x_train, y_train, x_test, var_names, test_var_names, **task):
    """The runner's result.json (labels, features used, timings) for one task written to
    a temporary directory and run by the peer environment's `python`; `task`: `seed`
    and `train_options` (see `_celltypist_runner`)."""
    with tempfile.TemporaryDirectory(prefix="cellvec-celltypist-") as tmp:
        runner.write_task(Path(tmp), x_train, y_train, x_test, var_names, test_var_names, **task)
        out = subprocess.run(
            [str(python), str(RUNNER), tmp],
            capture_output=True,
            text=True,
            env=_clean_env(),
        )
        result_file = Path(tmp) / runner.RESULT
        if out.returncode != 0 or not result_file.exists():
            tail = "\n".join(out.stderr.strip().splitlines()[-10:])
            hint = (
                f" {python} has no celltypist: use peer_env() to make an environment with "
                f"{' and '.join(REQUIREMENTS)}."
                if "No module named 'celltypist'" in out.stderr
                else ""
            )
            raise CellvecError(
                f"CellTypist failed (exit {out.returncode}) on {x_train.shape[0]:,} reference "
                f"and {x_test.shape[0]:,} query cells:\n{tail}\n{hint}".rstrip()
            )
        return json.loads(result_file.read_text())
