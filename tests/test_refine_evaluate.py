from dataclasses import replace

import numpy as np
import pytest
import scipy.sparse as sp

from cellvec.cell_index.build import BuildOptions, build_atlas
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import RefineOptions, encode_weights, fit_refinement
from cellvec.evaluation.baselines import expression_baseline
from cellvec.evaluation.evaluate import evaluate
from cellvec.evaluation.plan import EvaluationPlan, Scenarios, Transfer
from helpers import METRIC_KEYS, tiny_adata

FAST = {"steps": 30, "batch_size": 32}


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
    h1, r1 = fit_refinement(w, basis, y, seed=7, options=RefineOptions(**FAST))
    h2, r2 = fit_refinement(w, basis, y, seed=7, options=RefineOptions(**FAST))
    h3, _ = fit_refinement(w, basis, y, seed=8, options=RefineOptions(**FAST))
    assert set(h1) == {"w1", "b1", "w2", "b2", "skip", "cell_mean", "gene_gate", "gene_delta"}
    for k in h1:
        np.testing.assert_array_equal(h1[k], h2[k])
    assert r1["history"] == r2["history"]
    assert any(not np.array_equal(h1[k], h3[k]) for k in h1)


def test_refined_vectors_are_unit_length_and_numpy_only():
    w, basis, y = _toy()
    params, report = fit_refinement(w, basis, y, seed=0, options=RefineOptions(out_dim=8, **FAST))
    out = encode_weights(w, basis, params)
    assert out.shape == (120, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert report["steps"] == 30 and report["n_cells"] == 120


def test_gene_gates_turn_down_a_gene_every_cell_expresses():
    """Isolating subtype features from shared background: a gene that dominates every
    cell's weights but says nothing about its class is gated down, the markers are not."""
    rng = np.random.default_rng(0)
    n, g = 200, 30
    y = np.arange(n) % 4
    x = np.zeros((n, g), np.float32)
    x[:, 0] = 5.0  # housekeeping: highest in every cell
    for c in range(4):
        x[y == c, 1 + c * 5 : 6 + c * 5] = rng.uniform(1, 2, size=((y == c).sum(), 5))
    x[:, 21:] = rng.uniform(0, 1, size=(n, 9))
    w = sp.csr_matrix(x / x.sum(1, keepdims=True))
    basis = rng.normal(size=(g, 16)).astype(np.float32)
    params, _ = fit_refinement(w, basis, y, options=RefineOptions(steps=150, batch_size=64), seed=0)
    gate = params["gene_gate"]
    assert gate[0] < np.median(gate[1:21])


def test_unrefined_recipe_fits_only_the_reference_mean():
    w, basis, y = _toy()
    params, report = fit_refinement(w, basis, y, recipe=Recipe(refine="none"))
    assert set(params) == {"cell_mean"} and report["mode"] == "none"
    np.testing.assert_allclose(
        params["cell_mean"], np.asarray(w.mean(0) @ basis).ravel(), rtol=1e-5
    )


def test_supcon_without_labels_names_the_fix():
    from cellvec.errors import CellvecError

    w, basis, _ = _toy()
    with pytest.raises(CellvecError, match="--label-key.*--refine simclr"):
        fit_refinement(
            w, basis, None, recipe=Recipe(refine="supcon"), options=RefineOptions(**FAST)
        )


def test_simclr_without_labels():
    w, basis, _ = _toy()
    head, report = fit_refinement(
        w, basis, None, recipe=Recipe(refine="simclr"), options=RefineOptions(**FAST), seed=0
    )
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


def test_partial_balance_draws_classes_as_the_square_root_of_their_size():
    from cellvec.cell_index.refine import balanced_sampling_weights

    y = np.array([0] * 3000 + [1] * 300 + [2] * 3)
    p = balanced_sampling_weights(y, 0.5)
    per_class = np.array([p[y == c].sum() for c in (0, 1, 2)])
    np.testing.assert_allclose(per_class, np.sqrt([3000, 300, 3]) / np.sqrt([3000, 300, 3]).sum())
    assert per_class[2] > 20 * 3 / len(y)  # the rare class is still drawn far above its share


def test_sparse_product_matches_the_dense_product_and_its_gradient():
    import torch

    from cellvec.cell_index.refine import _sparse_product

    rng = np.random.default_rng(0)
    w = sp.random(32, 50, density=0.2, format="csr", random_state=1, dtype=np.float32)
    a = torch.tensor(rng.normal(size=(50, 8)).astype(np.float32), requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    grad = torch.tensor(rng.normal(size=(32, 8)).astype(np.float32))
    (_sparse_product().apply(w, a) * grad).sum().backward()
    (torch.from_numpy(w.toarray()) @ b * grad).sum().backward()
    np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-5, atol=1e-6)
    dense = (torch.from_numpy(w.toarray()) @ b).detach().numpy()
    np.testing.assert_allclose(_sparse_product().apply(w, a).detach().numpy(), dense, atol=1e-6)


def test_gene_adapter_gradients_match_autograd():
    """The hand-written gradients of the gates and corrections (penalties included) are
    autograd's for W @ (exp(a) * (E + D)) over the batch's genes, with the gates put
    on the weights as fit_refinement does."""
    import torch

    from cellvec.cell_index.refine import _GeneAdapter, _sparse_product

    rng = np.random.default_rng(0)
    e = torch.tensor(rng.normal(size=(40, 8)).astype(np.float32))
    adapter = _GeneAdapter(e, delta_penalty=1.0, gate_penalty=0.01)
    adapter.log_gate += torch.tensor(rng.normal(0, 0.3, 40).astype(np.float32))
    adapter.vectors += torch.tensor(rng.normal(0, 0.1, (40, 8)).astype(np.float32))
    genes = np.sort(rng.choice(40, 15, replace=False))
    w = sp.random(6, 15, density=0.4, format="csr", random_state=2, dtype=np.float32)
    out_grad = torch.tensor(rng.normal(size=(6, 8)).astype(np.float32))
    scaled = sp.csr_matrix((w.data * adapter.gates(genes)[w.indices], w.indices, w.indptr), w.shape)
    rows = adapter.rows(torch.from_numpy(genes))
    (_sparse_product().apply(scaled, rows) * out_grad).sum().backward()
    adapter.backward(rows)

    g = torch.from_numpy(genes)
    log_gate = adapter.log_gate.clone().requires_grad_(True)
    delta = (adapter.vectors - e).requires_grad_(True)
    a = torch.exp(log_gate[g])[:, None] * (e[g] + delta[g])
    penalty = 1.0 * (delta**2).sum() / float((e**2).sum()) + 0.01 * (log_gate**2).mean()
    ((torch.from_numpy(w.toarray()) @ a * out_grad).sum() + penalty).backward()
    np.testing.assert_allclose(
        adapter.vectors.grad.numpy(), delta.grad.numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        adapter.log_gate.grad.numpy(), log_gate.grad.numpy(), rtol=1e-5, atol=1e-6
    )
    assert adapter.penalty() == pytest.approx(float(penalty), rel=1e-5)
    gates, deltas = adapter.arrays()
    np.testing.assert_allclose(gates, np.exp(log_gate.detach().numpy()), rtol=1e-6)
    np.testing.assert_allclose(deltas, delta.detach().numpy(), atol=1e-7)


def test_refined_atlas_maps_queries_without_retraining(fake_store):
    ref = tiny_adata(n_cells=90, seed=1)
    atlas = build_atlas(
        ref,
        store=fake_store,
        name="ref",
        label_key="cell_type",
        recipe=Recipe(top_genes=10, refine="supcon"),
        options=BuildOptions(refine_options=FAST),
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
    """The head is trained on reference cells only: query content cannot influence it.
    Mapping a query fits nothing, and leaves the head's arrays, in memory and in the store,
    as the build made them."""
    import cellvec.cell_index.fitting as fitting_mod
    from cellvec.cell_index.artifacts import load_artifact
    from cellvec.cell_index.atlas import Atlas

    seen = []
    real = fitting_mod.fit_refinement

    def spy(w, basis, labels, **kw):
        seen.append(w.shape[0])
        return real(w, basis, labels, **kw)

    monkeypatch.setattr(fitting_mod, "fit_refinement", spy)
    ref = tiny_adata(n_cells=60, seed=1)
    build_atlas(
        ref,
        store=fake_store,
        name="ref",
        label_key="cell_type",
        recipe=Recipe(refine="supcon"),
        options=BuildOptions(refine_options=FAST),
    )
    assert seen == [60, 60]  # the atlas's cross-species view, then the atlas
    atlas = Atlas.open(fake_store, "ref")
    head_hash = atlas.recipe.head_hash
    head = {k: v.copy() for k, v in atlas.encoder().refinement.items()}
    assert "w2" in head  # a trained head, not only the gene rows
    q = tiny_adata(n_cells=30, seed=9, prefix="q")
    scrambled = q.copy()
    scrambled.X = q.X[:, ::-1]  # each cell's values on other genes: unlike any reference cell
    for query in (q, scrambled):
        assert len(map_cells(query, atlas).labels) == 30
    assert seen == [60, 60]  # mapping fitted nothing
    for arrays in (atlas.encoder().refinement, load_artifact(fake_store, head_hash)):
        assert arrays.keys() == head.keys()
        for k in head:
            np.testing.assert_array_equal(arrays[k], head[k], err_msg=k)
    assert Atlas.open(fake_store, "ref").recipe.head_hash == head_hash


def test_evaluate_reports_every_representation(fake_store):
    data = tiny_adata(n_cells=90, seed=4)
    res = evaluate(
        data,
        label_key="cell_type",
        store=fake_store,
        recipe=Recipe(refine="supcon", top_genes=10),
        plan=EvaluationPlan(folds=3, baselines=True, refine_options=FAST),
        scenarios=Scenarios(data_limited=(5, 10)),
    )
    d = res.to_dict()
    assert {
        "pca_knn",
        "logreg_expr",
        "logreg_balanced",
        "naive_mean",
        "graph_baseline",
        "cellvec",
    } <= set(d["representations"])
    for m in d["representations"].values():
        assert set(m) >= METRIC_KEYS
        assert m["n_cells"] == 90
    assert d["representations"]["cellvec"]["accuracy"] >= 0.9
    assert set(d["data_limited"]["cellvec"]) == {"5", "10"}
    # the prior without refinement beside it: small references can over-fit refinement
    assert set(d["data_limited"]["cellvec_unrefined"]) == {"5", "10"}
    md = res.to_markdown()
    assert "| pca_knn |" in md and "per-class F1" in md


def test_weighted_logistic_regression_lets_a_small_class_win_its_own_cells():
    # 200 cells of A and 10 of B, overlapping; a query of B cells alone. Plain logistic
    # regression follows the reference's 20:1 mix; weighted by class size it does not.
    # Seeds 0-5 gave 0.21-0.58 plain and 0.72-0.85 weighted (seed 0: 0.30, 0.85).
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(np.vstack([rng.normal(0, 1, (200, 2)), rng.normal(1.5, 1, (10, 2))]) + 5)
    y = np.array(["A"] * 200 + ["B"] * 10)
    q = sp.csr_matrix(rng.normal(1.5, 1, (100, 2)) + 5)
    plain = (expression_baseline("logreg_expr", x, y, q, 15, 0) == "B").mean()
    weighted = (expression_baseline("logreg_balanced", x, y, q, 15, 0) == "B").mean()
    assert weighted >= 0.6 and weighted - plain >= 0.2
    with pytest.raises(ValueError, match="unknown expression baseline 'logreg'"):
        expression_baseline("logreg", x, y, q, 15, 0)


def test_evaluate_transfer(fake_store):
    res = evaluate(
        tiny_adata(n_cells=60, seed=1),
        label_key="cell_type",
        store=fake_store,
        recipe=Recipe(refine="none"),
        plan=EvaluationPlan(folds=3, baselines=True),
        scenarios=Scenarios(transfer=Transfer(tiny_adata(n_cells=30, seed=2, prefix="q"))),
    )
    assert res.transfer["cellvec"]["accuracy"] >= 0.9 and "pca_knn" in res.transfer


def test_too_many_folds():
    from cellvec.errors import CellvecError
    from cellvec.metrics import folds

    with pytest.raises(CellvecError, match="fewer --folds"):
        folds(np.array(["a", "b", "a", "b"]), 5, 0)


def test_same_seed_gives_the_same_atlas(tmp_path, gene_files):
    """Reproducible builds: two stores, one seed -> identical vectors, arrays and labels."""
    from helpers import build_tiny

    atlases = []
    for i in range(2):
        store = tmp_path / f"s{i}"
        build_tiny(gene_files, store)
        atlases.append(
            build_atlas(
                tiny_adata(n_cells=60, seed=1),
                store=store,
                name="ref",
                label_key="cell_type",
                options=BuildOptions(seed=3, refine_options=FAST),
            )
        )
    a, b = atlases
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.recipe.head_hash == b.recipe.head_hash
    q = tiny_adata(n_cells=30, seed=9, prefix="q")
    np.testing.assert_array_equal(map_cells(q, a).labels, map_cells(q, b).labels)


def test_a_query_with_fewer_genes_is_compared_over_the_shared_genes(fake_store):
    """Panel-aware mapping: the reference is re-aggregated over the query's genes."""
    ref = tiny_adata(n_cells=90, seed=1)
    atlas = build_atlas(
        ref,
        store=fake_store,
        name="ref",
        label_key="cell_type",
        options=BuildOptions(refine_options=FAST),
    )
    q = tiny_adata(n_cells=30, seed=9, prefix="q")
    panel = q[:, [i for i in range(q.n_vars) if i % 3 == 0]].copy()  # a third of the genes
    res = map_cells(panel, "ref", store=fake_store, truth_key="cell_type")
    assert 0.1 < res.gene_coverage < 0.6 and res.summary()["gene_coverage"] < 0.6
    assert res.metrics["accuracy"] >= 0.9
    full = map_cells(q, atlas, truth_key="cell_type")
    assert full.gene_coverage == 1.0
    vecs, _, _ = atlas.vectors_over(np.arange(0, len(atlas.encoder().refinement["gene_rows"])))
    np.testing.assert_allclose(vecs, atlas.vectors, atol=1e-5)  # all genes: the stored vectors


def test_typicality_calls_a_subtype_the_atlas_lacks_unassigned(fake_store):
    ref = tiny_adata(n_cells=120, seed=1)
    ref = ref[ref.obs["cell_type"] != "M"].copy()
    build_atlas(
        ref,
        store=fake_store,
        name="ref",
        label_key="cell_type",
        options=BuildOptions(calibration_split=0.2, refine_options=FAST),
    )
    q = tiny_adata(n_cells=60, seed=9, prefix="q")
    res = map_cells(q, "ref", store=fake_store, min_typicality=0.05)
    novel = (q.obs["cell_type"] == "M").to_numpy()
    assert (res.labels[novel] == "unassigned").mean() >= 0.9
    assert (res.labels[~novel] == "unassigned").mean() <= 0.2
    assert res.to_polars()["cellvec_typicality"].max() <= 1.0


def test_an_atlas_of_an_older_recipe_is_refused_with_the_fix(fake_store):
    import json

    from cellvec.cell_index.atlas import Atlas
    from cellvec.errors import StoreError
    from cellvec.storage import META_KEY, Store, replace_table

    build_atlas(
        tiny_adata(60),
        store=fake_store,
        name="old",
        label_key="cell_type",
        recipe=Recipe(refine="none"),
    )
    store = Store(fake_store)
    tbl = store.open_table("atlas_old").to_arrow()
    meta = json.loads(tbl.schema.metadata[META_KEY])
    meta["recipe"]["version"] = 1
    replace_table(store.db, "atlas_old", tbl.replace_schema_metadata({META_KEY: json.dumps(meta)}))
    with pytest.raises(StoreError, match="older cellvec.*cellvec atlas build"):
        Atlas.open(fake_store, "old")


def test_evaluate_panels_and_left_out_subtypes(fake_store):
    res = evaluate(
        tiny_adata(n_cells=90, seed=4),
        label_key="cell_type",
        store=fake_store,
        recipe=Recipe(top_genes=10),
        plan=EvaluationPlan(folds=3, refine_options=FAST),
        scenarios=Scenarios(panels=(0.5,), leave_out=("M",)),
    )
    d = res.to_dict()
    assert {"cellvec", "logreg_expr", "logreg_panel"} <= set(d["panels"]["0.5"])
    left = d["leave_out"]["M"]["cellvec"]
    assert left["cells"] == 30 and left["unassigned"] + left["mislabelled"] == pytest.approx(1)
    # each test's share of the missing subtype; together they make the unassigned share
    assert max(left["by_typicality"], left["by_mixing"]) <= left["unassigned"]
    assert left["unassigned"] <= left["by_typicality"] + left["by_mixing"] + 1e-9
    assert d["leave_out"]["M"]["logreg_expr"]["unassigned"] == 0  # it cannot say "not here"
    assert "left-out subtype" in res.to_markdown()


def test_tune_chooses_top_genes_and_k_on_the_reference_and_map_uses_them(fake_store):
    atlas = build_atlas(
        tiny_adata(n_cells=90, seed=1),
        store=fake_store,
        name="tuned",
        label_key="cell_type",
        options=BuildOptions(tune=True, refine_options=FAST),
    )
    grid = atlas.meta["tuning"]
    assert len(grid) == 6 and all(0 <= v <= 1 for v in grid.values())
    assert atlas.recipe.top_genes in (200, 1000) and atlas.k in (5, 10, 15)
    assert f"top_genes={atlas.recipe.top_genes} k={atlas.k}" in grid
    res = map_cells(tiny_adata(n_cells=30, seed=9, prefix="q"), "tuned", store=fake_store)
    assert res.k == atlas.k
    assert map_cells(tiny_adata(30, seed=9, prefix="q"), atlas, k=3).k == 3


def test_typicality_resolves_below_one_percent_with_small_classes():
    """Eight classes of 25 calibration cells: a per-class rank could not go below 1/26,
    so a 0.01 threshold never fired; pooled standardised ranks can."""
    from cellvec.cell_index.calls import typicality

    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(8), 25)
    centre = 0.6 + 0.04 * np.arange(8)
    calibration = (centre[codes] + rng.normal(0, 0.02, len(codes))).astype(np.float32)
    chosen = np.array([0, 7, 3])
    sims = np.array([[0.2], [centre[7]], [centre[3] - 0.02]])  # far off, typical, a bit low
    idx = np.array([[0], [7 * 25], [3 * 25]])
    p = typicality(idx, sims, codes, chosen, calibration)
    assert p[0] < 0.01
    assert 0.3 < p[1] < 0.7
    assert 0.05 < p[2] < p[1]


def test_typicality_counts_a_cells_views_as_one_cell():
    """A `Calibration` of several views of each calibration cell (another species'
    calibration) standardises by class as the cells themselves would: the same values
    given 32 times each give the same p-values within one rank, the class spreads shrunk
    towards the pooled one by cells, not by views."""
    from cellvec.cell_index.calibration import Calibration
    from cellvec.cell_index.calls import typicality

    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(4), [3, 5, 25, 40])  # small classes: shrinkage matters
    values = 0.6 + 0.1 * codes + rng.normal(0, 0.02, len(codes))
    chosen = rng.integers(0, 4, 50)
    sims = (0.6 + 0.1 * chosen + rng.normal(-0.02, 0.03, 50))[:, None]
    idx = np.array([np.flatnonzero(codes == c)[0] for c in chosen])[:, None]
    once = typicality(idx, sims, codes, chosen, values)
    np.testing.assert_array_equal(
        once, typicality(idx, sims, codes, chosen, Calibration.of_cells(values, codes))
    )
    views = Calibration(np.tile(codes, 32), np.tile(values, 32), draws=32)
    np.testing.assert_allclose(typicality(idx, sims, codes, chosen, views), once, atol=1 / 74)
    as_cells = Calibration(views.codes, views.values)  # 32 times the cells: tighter classes
    assert np.abs(typicality(idx, sims, codes, chosen, as_cells) - once).max() > 1 / 74


def test_species_calibration_bounds_its_views_and_keeps_each_levels_cells(monkeypatch):
    """`species_calibrations` gives each level the views of its own calibration cells, as
    many draws as `SPECIES_VIEWS` allows (never fewer than one), and one seed the same
    values twice; no calibration cell, no views."""
    from cellvec.cell_index import calibration
    from cellvec.cell_index.knn import build_index

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    codes, broad = np.arange(40) % 4, np.arange(40) % 2
    fine = np.full(40, np.nan)
    fine[:8] = 0.5
    coarse = np.full(40, np.nan)
    coarse[4:12] = 0.5
    asked = []

    def views_of(rows):
        asked.append(rows)
        return lambda g: vectors[rows] + g.normal(0, 0.1, (len(rows), 8)).astype(np.float32)

    index = build_index(vectors)
    cals = calibration.species_calibrations([fine, coarse], [codes, broad], index, views_of)
    assert asked[0].tolist() == list(range(12))  # one set of views serves both levels
    assert [c.draws for c in cals] == [calibration.SPECIES_DRAWS] * 2
    assert cals[0].codes.tolist() == np.tile(codes[:8], calibration.SPECIES_DRAWS).tolist()
    assert cals[1].codes.tolist() == np.tile(broad[4:12], calibration.SPECIES_DRAWS).tolist()
    again = calibration.species_calibrations([fine, coarse], [codes, broad], index, views_of)
    np.testing.assert_array_equal(again[0].values, cals[0].values)
    monkeypatch.setattr(calibration, "SPECIES_VIEWS", 30)  # 12 cells of both levels: 2 draws
    two = calibration.species_calibrations([fine, coarse], [codes, broad], index, views_of)
    assert [c.draws for c in two] == [2, 2] and len(two[0].values) == 16
    monkeypatch.setattr(calibration, "SPECIES_VIEWS", 5)  # fewer than the cells: still one
    assert calibration.species_calibrations([fine], [codes], index, views_of)[0].draws == 1
    none = calibration.species_calibrations([np.full(40, np.nan)], [codes], index, views_of)
    assert none[0].draws == 1 and len(none[0].values) == 0


def test_typicality_needs_held_out_calibration_cells(fake_store):
    """Calibrated on cells refinement trained on, every new cell would look atypical:
    mapping with --min-typicality on such an atlas is refused with the fix."""
    from cellvec.errors import CellvecError

    build_atlas(
        tiny_adata(90, seed=1),
        store=fake_store,
        name="ref",
        label_key="cell_type",
        options=BuildOptions(refine_options=FAST),
    )
    q = tiny_adata(n_cells=30, seed=9, prefix="q")
    with pytest.raises(CellvecError, match="--calibration-split"):
        map_cells(q, "ref", store=fake_store, min_typicality=0.01)
    res = map_cells(q, "ref", store=fake_store)
    assert np.isnan(res.typicality).all()  # unknown, not a misleading 1.0


def test_an_unknown_schedule_names_the_choices():
    from cellvec.errors import CellvecError

    w, basis, y = _toy()
    with pytest.raises(CellvecError, match="choose constant or cosine"):
        fit_refinement(w, basis, y, options=RefineOptions(schedule="linear", **FAST))


def test_panel_caches_keep_the_whole_atlas_and_the_last_four_panels():
    from cellvec.cell_index.panels import remember

    cache, made = {}, []

    def make(key):
        made.append(key)
        return f"value {key}"

    for key in [None, 1, 2, 3, 4, 1, 5]:
        assert remember(cache, key, lambda key=key: make(key)) == f"value {key}"
    assert made == [None, 1, 2, 3, 4, 5]  # 1 was still cached the second time
    assert list(cache) == [None, 2, 3, 4, 5]  # the oldest panel went, the whole atlas stays


def test_atlas_card_scores_only_the_cells_the_atlas_was_built_from(fake_store, tmp_path):
    """An atlas built with --exclude-labels never predicts the excluded class: its card's
    cross-validation leaves those cells out as the build did, so no score for it."""
    from cellvec.evaluation.evaluate import evaluate_atlas

    ref = tmp_path / "ref.h5ad"
    tiny_adata(n_cells=90, seed=1).write_h5ad(ref)
    build_atlas(
        ref,
        store=fake_store,
        name="no_m",
        label_key="cell_type",
        exclude_labels=["M"],
        recipe=Recipe(top_genes=10, refine="none"),
    )
    ev = evaluate_atlas(fake_store, "no_m", folds=2)
    assert set(ev["per_class_f1"]) == {"B", "T"} and ev["accuracy"] >= 0.9


def test_atlas_card_cross_validates_the_atlas_own_recipe(fake_store, tmp_path, monkeypatch):
    """Every choice the atlas was built with reaches the card's folds (skip_genes used to
    fall back to the default)."""
    import cellvec.evaluation.evaluate as ev_mod

    ref = tmp_path / "ref.h5ad"
    tiny_adata(n_cells=60, seed=1).write_h5ad(ref)
    built = Recipe(
        top_genes=10, weighting="softmax", skip_genes="none", refine="none", adapt_genes=False
    )
    build_atlas(ref, store=fake_store, name="own", label_key="cell_type", recipe=built)
    seen = []
    real = ev_mod.evaluate
    monkeypatch.setattr(
        ev_mod, "evaluate", lambda *a, **kw: seen.append(kw["recipe"]) or real(*a, **kw)
    )
    ev_mod.evaluate_atlas(fake_store, "own", folds=2)
    assert seen[0] == replace(built, model="fake")  # every choice, nothing the fit made


def test_level_shift_views_move_each_gene_alike_in_every_cell_of_a_batch():
    """`level_shift`: one log-normal factor per gene for the whole batch (a species moves a
    gene's level in every cell), not per cell; off, it draws nothing more."""
    from cellvec.cell_index.refine import augment_weights

    row = np.arange(1, 21, dtype=np.float32)
    w = sp.csr_matrix(np.tile(row / row.sum(), (6, 1)))
    plain = {"dropout": (0.0, 0.0), "noise": 0.0}
    before = augment_weights(w, np.random.default_rng(3), **plain)
    shifted = augment_weights(w, np.random.default_rng(3), level_shift=1.0, **plain)
    np.testing.assert_allclose(before.toarray(), w.toarray(), rtol=1e-6)
    dense = shifted.toarray()
    np.testing.assert_allclose(dense, np.tile(dense[0], (6, 1)))  # the same shift in each cell
    np.testing.assert_allclose(dense.sum(1), 1, rtol=1e-6)
    ratio = dense[0] / before.toarray()[0]
    assert ratio.max() / ratio.min() > 2  # sigma 1 over 20 genes: far from a common scale
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    off = augment_weights(w, a, level_shift=0.0)
    np.testing.assert_array_equal(off.toarray(), augment_weights(w, b).toarray())
    assert a.bit_generator.state == b.bit_generator.state


def test_level_shift_is_checked_before_anything_is_written_and_reaches_the_card_folds(
    fake_store, tmp_path, monkeypatch
):
    """Refinement options are checked (names and values) before any work, recorded in the
    atlas, and the card's folds train with them: `--level-shift` is not a recipe field, so
    without that it would be dropped there (as `skip_genes` once fell back to the default)."""
    import cellvec.evaluation.evaluate as ev_mod
    from cellvec.errors import CellvecError
    from cellvec.storage import Store

    w, basis, y = _toy()
    for bad in (-0.5, float("nan"), 4.0, "one", None):
        with pytest.raises(CellvecError, match="level_shift"):
            RefineOptions(level_shift=bad)
    # as an atlas's metadata reads back from JSON
    assert RefineOptions.from_dict({"dropout": [0.1, 0.5]}).dropout == (0.1, 0.5)
    same = fit_refinement(w, basis, y, seed=2, options=RefineOptions(**FAST))[0]
    shifted, report = fit_refinement(
        w, basis, y, seed=2, options=RefineOptions(level_shift=1.0, **FAST)
    )
    assert report["level_shift"] == 1.0 and not np.array_equal(same["w1"], shifted["w1"])
    ref = tmp_path / "ref.h5ad"
    tiny_adata(n_cells=90, seed=1).write_h5ad(ref)
    tables = set(Store(fake_store).table_names())
    for options, match in (
        ({"level_shift": -1.0}, "level_shift"),
        ({"level_shfit": 1.0}, "level_shfit: not refinement options"),
    ):
        with pytest.raises(CellvecError, match=match):
            build_atlas(
                ref,
                store=fake_store,
                name="shifted",
                label_key="cell_type",
                recipe=Recipe(top_genes=10),
                options=BuildOptions(refine_options=options),
            )
        assert set(Store(fake_store).table_names()) == tables  # nothing half-written
    given = {"level_shift": 1.0, **FAST}
    atlas = build_atlas(
        ref,
        store=fake_store,
        name="shifted",
        label_key="cell_type",
        recipe=Recipe(top_genes=10, weighting="softmax"),
        options=BuildOptions(refine_options=given),
    )
    assert atlas.meta["refinement"]["level_shift"] == 1.0
    assert atlas.meta["refine_options"] == given
    q = tiny_adata(n_cells=30, seed=9, prefix="q")
    assert map_cells(q, atlas, truth_key="cell_type").metrics["accuracy"] >= 0.9
    seen = []
    real = ev_mod.evaluate
    monkeypatch.setattr(
        ev_mod, "evaluate", lambda *a, **kw: seen.append(kw["plan"]) or real(*a, **kw)
    )
    ev_mod.evaluate_atlas(fake_store, "shifted", folds=2)
    assert seen[0].refine_options == given


def test_refinement_options_read_back_from_an_atlas_are_bounded(fake_store, tmp_path):
    """An imported bundle's atlas metadata is not trusted: refinement options that would
    train for days (or are not options at all) are refused before the card's folds fit."""
    import json

    from cellvec.errors import CellvecError
    from cellvec.evaluation.evaluate import evaluate_atlas
    from cellvec.storage import META_KEY, Store, replace_table

    ref = tmp_path / "ref.h5ad"
    tiny_adata(n_cells=60, seed=1).write_h5ad(ref)
    build_atlas(
        ref, store=fake_store, name="ext", label_key="cell_type", recipe=Recipe(top_genes=10)
    )
    store = Store(fake_store)
    tbl = store.open_table("atlas_ext").to_arrow()
    meta = json.loads(tbl.schema.metadata[META_KEY])
    for hostile, match in (
        ({"steps": 10**12}, "steps 1000000000000 is not a number from 1 to 100000"),
        ({"batch_size": 10**9}, "batch_size"),
        ({"dropout": [0.1]}, r"dropout \(0.1,\): give \(low, high\)"),
        ({"level_shift": "1; rm -rf"}, "level_shift"),
        ("steps=1e12", "give them by name"),
        ({"__class__": 1}, "not refinement options"),
    ):
        meta["refine_options"] = hostile
        replace_table(
            store.db, "atlas_ext", tbl.replace_schema_metadata({META_KEY: json.dumps(meta)})
        )
        with pytest.raises(CellvecError, match=match):
            evaluate_atlas(fake_store, "ext", folds=2)


def test_a_representation_starts_from_the_prior_only_with_the_model_s_own_vectors():
    """`Predictors.parts`: cellvec with the plan's model starts from its prior; another
    model (`cellvec:OTHER`) and the controls never do, so the species view `evaluate`
    fits for `cellvec:OTHER` is not refused for a prior its atlas never used."""
    from cellvec.evaluation.representations import Predictors

    prior = object()
    pred = Predictors({}, Recipe(model="m"), 15, 0, {}, prior=prior)
    assert pred.parts("cellvec") == ({}, "m", "model", prior)
    assert pred.parts("cellvec:other")[1:] == ("other", "model", None)
    assert pred.parts("random_vectors")[1:] == ("m", "random", None)
    assert pred.parts("cellvec_unrefined")[3] is prior
