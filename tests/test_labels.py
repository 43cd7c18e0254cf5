"""What a user asks of the labels: a blocklist, two levels, a summary per cluster."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cellvec.cell_index.atlas import build_atlas
from cellvec.cell_index.mapping import map_cells, search_allowed
from cellvec.cli import cli
from conftest import tiny_adata


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("blocked_share", [0.0, 0.5, 0.97])
def test_search_past_blocked_cells_equals_exact_search_over_the_allowed(blocked_share):
    from cellvec.cell_index.knn import FlatIndex, exact_knn

    rng = np.random.default_rng(0)
    ref, q = _unit(rng.normal(size=(600, 16))), _unit(rng.normal(size=(40, 16)))
    allowed = rng.random(600) >= blocked_share
    idx, sim = search_allowed(FlatIndex(ref), q, 15, allowed)
    keep = np.flatnonzero(allowed)
    want_idx, want_sim = exact_knn(q, ref[keep], 15)
    np.testing.assert_array_equal(idx, keep[want_idx])
    np.testing.assert_allclose(sim, want_sim, rtol=1e-5)


def test_fewer_allowed_cells_than_k_pad_the_rows():
    from cellvec.cell_index.knn import FlatIndex

    rng = np.random.default_rng(1)
    ref, q = _unit(rng.normal(size=(50, 8))), _unit(rng.normal(size=(3, 8)))
    allowed = np.zeros(50, dtype=bool)
    allowed[[4, 9, 30]] = True
    idx, sim = search_allowed(FlatIndex(ref), q, 5, allowed)
    assert (np.sort(idx[:, :3], axis=1) == [4, 9, 30]).all()
    assert (idx[:, 3:] == -1).all() and np.isneginf(sim[:, 3:]).all()


def _with_doublets(seed=1, n=90):
    """Tiny cells where a third of the T cells are labelled 'Doublet' (they look like T)."""
    a = tiny_adata(n_cells=n, seed=seed)
    labels = a.obs["cell_type"].astype(str).to_numpy()
    t = np.flatnonzero(labels == "T")
    labels[t[::3]] = "Doublet"
    a.obs["cell_type"] = labels
    return a


def test_excluded_labels_are_never_given_and_their_cells_never_vote(fake_store):
    build_atlas(
        _with_doublets(), store=fake_store, name="dbl", label_key="cell_type", refine="none"
    )
    q = tiny_adata(n_cells=30, seed=5, prefix="q")
    free = map_cells(q, "dbl", store=fake_store, k=10)
    assert (free.labels == "Doublet").any()  # without the blocklist, doublets answer
    res = map_cells(
        q, "dbl", store=fake_store, k=10, truth_key="cell_type", exclude_labels="Doublet,Unknown"
    )
    assert not (res.labels == "Doublet").any()
    assert res.metrics["accuracy"] == 1.0
    doublet = list(res.classes).index("Doublet")
    assert (res.scores[:, doublet] == 0).all()
    np.testing.assert_allclose(res.scores.sum(1), 1, atol=1e-9)  # k others voted
    assert res.excluded_labels == ["Doublet"]  # Unknown is not a label of this atlas
    assert res.summary()["excluded_labels"] == ["Doublet"]


def test_excluding_every_class_is_refused(fake_store):
    from cellvec.errors import CellvecError

    build_atlas(
        tiny_adata(n_cells=60), store=fake_store, name="t", label_key="cell_type", refine="none"
    )
    with pytest.raises(CellvecError, match="excludes every class"):
        map_cells(tiny_adata(n_cells=9), "t", store=fake_store, exclude_labels=["T", "B", "M"])


def test_atlas_build_drops_excluded_cells_and_records_them(fake_store):
    atlas = build_atlas(
        _with_doublets(),
        store=fake_store,
        name="clean",
        label_key="cell_type",
        refine="none",
        exclude_labels="Doublet,Unknown",
    )
    assert "Doublet" not in set(atlas.labels) and len(atlas.vectors) == 80
    assert atlas.meta["excluded_labels"] == {"Doublet": 10, "Unknown": 0}
    assert atlas.summary()["excluded_labels"] == {"Doublet": 10, "Unknown": 0}


def test_exclude_labels_through_the_cli(fake_store, tmp_path):
    ref, query = tmp_path / "ref.h5ad", tmp_path / "q.h5ad"
    _with_doublets().write_h5ad(ref)
    tiny_adata(n_cells=30, seed=5, prefix="q").write_h5ad(query)
    r = CliRunner()
    common = ["--store", str(fake_store)]
    res = r.invoke(
        cli,
        ["atlas", "build", str(ref), *common, "--name", "dbl", "--label-key", "cell_type"]
        + ["--refine", "none", "--json"],
    )
    assert res.exit_code == 0, res.output
    res = r.invoke(
        cli,
        ["map", str(query), *common, "--atlas", "dbl", "--exclude-labels", "Doublet", "--json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["excluded_labels"] == ["Doublet"] and "Doublet" not in out["label_counts"]
