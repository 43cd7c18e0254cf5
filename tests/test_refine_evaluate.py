import numpy as np
import pytest
import scipy.sparse as sp

from cellvec.cell_index.atlas import build_atlas
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.refine import apply_head, train_head
from cellvec.evaluation.evaluate import evaluate
from conftest import METRIC_KEYS, tiny_adata

FAST = {"epochs": 6, "patience": 3, "batch_size": 32}


def _toy(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    w = sp.random(n, 40, density=0.3, random_state=seed, format="csr", dtype=np.float32)
    w = sp.csr_matrix(
        w
        + sp.csr_matrix(
            (
                np.ones(n),
                (np.arange(n), y * 10),
            ),
            shape=(n, 40),
        )
    )
    basis = rng.normal(size=(40, 16)).astype(np.float32)
    return w, basis, y


def test_refinement_is_deterministic_under_a_seed():
    w, basis, y = _toy()
    h1, r1 = train_head(w, basis, y, seed=7, **FAST)
    h2, r2 = train_head(w, basis, y, seed=7, **FAST)
    h3, _ = train_head(w, basis, y, seed=8, **FAST)
    for k in h1:
        np.testing.assert_array_equal(h1[k], h2[k])
    assert r1["history"] == r2["history"]
    assert any(not np.array_equal(h1[k], h3[k]) for k in h1)


def test_head_output_is_unit_length_and_numpy_only():
    w, basis, y = _toy()
    head, report = train_head(w, basis, y, seed=0, out_dim=8, **FAST)
    out = apply_head(head, np.asarray(w @ basis))
    assert out.shape == (120, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert report["n_train"] + report["n_val"] == 120 and report["epochs_run"] >= 1


def test_supcon_without_labels_names_the_fix():
    from cellvec.errors import CellvecError

    w, basis, _ = _toy()
    with pytest.raises(CellvecError, match="--label-key.*--refine simclr"):
        train_head(w, basis, None, mode="supcon", **FAST)


def test_simclr_without_labels():
    w, basis, _ = _toy()
    head, report = train_head(w, basis, None, mode="simclr", seed=0, **FAST)
    assert report["mode"] == "simclr" and head["w1"].shape[0] == 16


def test_class_balanced_sampling_gives_rare_classes_equal_weight():
    from cellvec.cell_index.refine import balanced_sampling_weights

    y = np.array([0] * 3000 + [1] * 300 + [2] * 3)
    p = balanced_sampling_weights(y)
    per_class = np.array([p[y == c].sum() for c in (0, 1, 2)])
    np.testing.assert_allclose(per_class, 1 / 3)
    draws = np.random.default_rng(0).choice(len(y), size=30_000, p=p)
    assert (
        abs(np.mean(y[draws] == 2) - 1 / 3) < 0.02
    )  # the 3-cell class fills a third of the batches


def test_refined_atlas_maps_queries_without_retraining(fake_store):
    ref = tiny_adata(n_cells=90, seed=1)
    atlas = build_atlas(
        ref,
        store=fake_store,
        name="ref",
        label_key="cell_type",
        refine="supcon",
        refine_options=FAST,
        top_genes=10,
    )
    assert atlas.recipe.refine == "supcon" and atlas.recipe.head_hash
    assert atlas.vectors.shape[1] == 128 and atlas.meta["refinement"]["mode"] == "supcon"
    q = tiny_adata(n_cells=30, seed=9, prefix="q")
    res = map_cells(q, "ref", store=fake_store, truth_key="cell_type")
    assert res.metrics["accuracy"] >= 0.9
    # never fitted on the query: mapping twice, or mapping a different query, leaves the atlas as it was
    again = map_cells(q, "ref", store=fake_store)
    np.testing.assert_array_equal(res.vectors, again.vectors)
    from cellvec.cell_index.atlas import Atlas

    assert Atlas.open(fake_store, "ref").recipe.head_hash == atlas.recipe.head_hash


def test_query_cells_do_not_change_the_head(fake_store, monkeypatch):
    """The head is trained on reference cells only: query content cannot influence it."""
    import cellvec.cell_index.atlas as atlas_mod

    seen = {}
    real = atlas_mod.train_head

    def spy(w, basis, labels, **kw):
        seen["n"] = w.shape[0]
        return real(w, basis, labels, **kw)

    monkeypatch.setattr(atlas_mod, "train_head", spy)
    ref = tiny_adata(n_cells=60, seed=1)
    build_atlas(
        ref,
        store=fake_store,
        name="ref",
        label_key="cell_type",
        refine="supcon",
        refine_options=FAST,
    )
    assert seen["n"] == 60


def test_evaluate_reports_every_representation(fake_store):
    data = tiny_adata(n_cells=90, seed=4)
    res = evaluate(
        data,
        label_key="cell_type",
        store=fake_store,
        refine="supcon",
        folds=3,
        baselines=True,
        top_genes=10,
        data_limited=[5, 10],
        refine_options=FAST,
    )
    d = res.to_dict()
    assert {"pca_knn", "logreg_expr", "naive_mean", "graph_baseline", "cellvec"} <= set(
        d["representations"]
    )
    for m in d["representations"].values():
        assert set(m) >= METRIC_KEYS
        assert m["n_cells"] == 90
    assert d["representations"]["cellvec"]["accuracy"] >= 0.9
    assert set(d["data_limited"]["cellvec"]) == {"5", "10"}
    md = res.to_markdown()
    assert "| pca_knn |" in md and "per-class F1" in md


def test_evaluate_transfer(fake_store):
    res = evaluate(
        tiny_adata(n_cells=60, seed=1),
        label_key="cell_type",
        store=fake_store,
        refine="none",
        folds=3,
        baselines=True,
        query=tiny_adata(n_cells=30, seed=2, prefix="q"),
    )
    assert res.transfer["cellvec"]["accuracy"] >= 0.9 and "pca_knn" in res.transfer


def test_too_many_folds():
    from cellvec.errors import CellvecError
    from cellvec.evaluation.evaluate import _folds

    with pytest.raises(CellvecError, match="fewer --folds"):
        _folds(np.array(["a", "b", "a", "b"]), 5, 0)
