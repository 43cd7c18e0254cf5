"""What a user asks of the labels: a blocklist, two levels, a summary per cluster."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cellvec.cell_index.build import BuildOptions, build_atlas
from cellvec.cell_index.calls import search_allowed
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.recipe import Recipe
from cellvec.cli import cli
from helpers import tiny_adata, two_levels


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _one_level_atlas(store, name: str):
    """An atlas of 60 tiny cells labelled T, B and M."""
    return build_atlas(
        tiny_adata(n_cells=60),
        store=store,
        name=name,
        label_key="cell_type",
        recipe=Recipe(refine="none"),
    )


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
        _with_doublets(),
        store=fake_store,
        name="dbl",
        label_key="cell_type",
        recipe=Recipe(refine="none"),
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

    _one_level_atlas(fake_store, "t")
    with pytest.raises(CellvecError, match="excludes every class"):
        map_cells(tiny_adata(n_cells=9), "t", store=fake_store, exclude_labels=["T", "B", "M"])


def test_atlas_build_drops_excluded_cells_and_records_them(fake_store):
    atlas = build_atlas(
        _with_doublets(),
        store=fake_store,
        name="clean",
        label_key="cell_type",
        exclude_labels="Doublet,Unknown",
        recipe=Recipe(refine="none"),
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


def _two_level_atlas(store, **kw):
    """Atlas "two" of `_two_levels()` cells: cell_type under cell_type_broad; `kw` are
    `BuildOptions`."""
    return build_atlas(
        two_levels(),
        store=store,
        name="two",
        label_key="cell_type",
        broad_label_key="cell_type_broad",
        recipe=Recipe(refine="none"),
        options=BuildOptions(**kw),
    )


def test_broad_label_given_where_the_fine_one_is_unassigned(fake_store, tmp_path):
    import anndata as ad

    from cellvec.sql import connect_sql

    atlas = _two_level_atlas(fake_store, calibration_split=0.2)
    assert atlas.meta["broad_classes"] == {"B": 30, "M": 30, "T": 30}
    q = two_levels(seed=7, n=60, prefix="q")
    res = map_cells(
        q,
        "two",
        store=fake_store,
        k=15,
        min_confidence=0.75,
        truth_key="cell_type",
        broad_truth_key="cell_type_broad",
    )
    fine, broad = res.labels, res.broad.labels
    t_cells = q.obs["cell_type_broad"].to_numpy() == "T"
    assert (fine[t_cells] == "unassigned").mean() > 0.5  # T_a / T_b cannot be told apart
    assert (broad[t_cells] == "T").all()  # ... but every T cell is called T
    assert res.broad.metrics["accuracy"] == 1.0
    given = fine != "unassigned"
    parent = {"T_a": "T", "T_b": "T", "B": "B", "M": "M"}
    assert [parent[x] for x in fine[given]] == list(broad[given])  # levels never disagree
    summary = res.summary()
    assert summary["broad"]["accuracy"] == 1.0
    assert summary["broad"]["broad_only_fraction"] == pytest.approx(
        ((fine == "unassigned") & (broad != "unassigned")).mean()
    )
    back = ad.read_h5ad(res.write(tmp_path / "m.h5ad"))
    assert back.obs["cellvec_label_broad"].astype(str).tolist() == list(broad)
    assert {"cellvec_confidence_broad", "cellvec_typicality_broad"} <= set(back.obs)
    res.save(fake_store, "two")
    sql = connect_sql(fake_store)
    got = sql.query("SELECT label_broad, count(*) AS n FROM atlas_two GROUP BY 1 ORDER BY 1")
    assert got["label_broad"].to_list() == ["B", "M", "T"]
    got = sql.query(
        "SELECT cellvec_label_broad AS b, count(*) AS n FROM mapping_two GROUP BY 1 ORDER BY 1"
    )
    assert dict(zip(got["b"], got["n"]))["T"] == t_cells.sum()


def test_broad_level_is_refused_on_a_one_level_atlas_and_absent_from_its_results(fake_store):
    from cellvec.errors import CellvecError

    _one_level_atlas(fake_store, "one")
    q = tiny_adata(n_cells=9, prefix="q")
    res = map_cells(q, "one", store=fake_store)
    assert res.broad is None and "broad" not in res.summary()
    assert "cellvec_label_broad" not in res.to_polars().columns
    q.obs["cell_type_broad"] = "x"
    with pytest.raises(CellvecError, match="--broad-label-key"):
        map_cells(q, "one", store=fake_store, broad_truth_key="cell_type_broad")


def test_broad_truth_alone_scores_the_broad_level(fake_store):
    _two_level_atlas(fake_store)
    res = map_cells(
        two_levels(seed=7, n=30, prefix="q"),
        "two",
        store=fake_store,
        broad_truth_key="cell_type_broad",
    )
    assert res.metrics is None and res.broad.metrics["accuracy"] == 1.0
    assert res.broad.truth.tolist() == two_levels(seed=7, n=30).obs["cell_type_broad"].tolist()


def test_excluding_a_broad_label_drops_its_fine_classes_too(fake_store):
    atlas = _two_level_atlas(fake_store)
    res = map_cells(tiny_adata(n_cells=30, seed=3, prefix="q"), atlas, exclude_labels="T")
    assert not np.isin(res.labels, ["T_a", "T_b"]).any()
    assert not (res.broad.labels == "T").any()


def test_the_service_answers_both_levels_like_local_mapping(fake_store):
    import httpx

    from cellvec import Client
    from cellvec.service import create_app
    from servers import Server

    _two_level_atlas(fake_store, calibration_split=0.2)
    q = two_levels(seed=7, n=30, prefix="q")
    options = dict(min_confidence=0.75, min_typicality=0.05)
    local = map_cells(q, "two", store=fake_store, **options)
    panel = q[:, [i for i in range(q.n_vars) if i % 3 == 0]].copy()
    local_panel = map_cells(panel, "two", store=fake_store, **options)
    with Server(create_app(fake_store)) as url:
        res = Client(url).map(q, atlas="two", broad_truth_key="cell_type_broad", **options)
        res_panel = Client(url).map(panel, atlas="two", **options)
        x = q.X.tocsr()
        body = {
            "genes": list(q.var_names),
            "cells": [{"id": "c0", "indices": x[0].indices.tolist(), "values": x[0].data.tolist()}],
        }
        cell = httpx.post(f"{url}/v1/atlases/two/map", json=body).json()["cells"][0]
    assert res.broad.labels.tolist() == local.broad.labels.tolist()
    np.testing.assert_allclose(res.broad.confidence, local.broad.confidence, atol=1e-5)
    np.testing.assert_allclose(res.broad.typicality, local.broad.typicality, atol=1e-5)
    assert res_panel.broad.labels.tolist() == local_panel.broad.labels.tolist()
    assert res.broad.metrics["n_cells"] == 30
    assert cell["label_broad"] == local.broad.labels[0]
    assert cell["confidence_broad"] == pytest.approx(local.broad.confidence[0], abs=1e-4)


def test_evaluate_scores_both_levels(fake_store):
    from cellvec.cell_index.recipe import Recipe
    from cellvec.evaluation.evaluate import evaluate
    from cellvec.evaluation.plan import EvaluationPlan, Scenarios, UnassignedCall

    res = evaluate(
        two_levels(n=90, seed=4),
        label_key="cell_type",
        broad_label_key="cell_type_broad",
        store=fake_store,
        recipe=Recipe(top_genes=10, refine="none"),
        plan=EvaluationPlan(folds=3, baselines=True, representations=("logreg_expr", "cellvec")),
        scenarios=Scenarios(call=UnassignedCall(min_confidence=0.75), leave_out=("T_b",)),
    )
    d = res.to_dict()
    assert d["broad"]["cellvec"]["accuracy"] == 1.0 and d["broad"]["logreg_expr"]["n_cells"] == 90
    two = d["two_levels"]
    assert two["fine"]["unassigned_fraction"] > 0.1  # T_a / T_b votes split below 0.75
    assert two["broad"]["unassigned_fraction"] < two["fine"]["unassigned_fraction"]
    assert two["broad"]["macro_f1_without"] == 1.0
    assert two["broad_given"] == two["broad_right"] > 0.5 * two["fine_unassigned"]
    # a missing T subtype's cells still get T at the broad level
    assert d["leave_out"]["T_b"]["cellvec"]["broad_right"] > 0.8
    md = res.to_markdown()
    assert "broad level (cell_type_broad" in md and "right broad label" in md


def test_confidence_per_cluster(fake_store, tmp_path):
    import anndata as ad

    from cellvec.sql import connect_sql

    _two_level_atlas(fake_store)
    q = two_levels(seed=7, n=60, prefix="q")
    q.obs["leiden"] = np.where(q.obs["cell_type_broad"] == "T", "10", "2")  # T vs the rest
    q.obs.loc[q.obs["cell_type"] == "M", "leiden"] = "9"
    res = map_cells(q, "two", store=fake_store, k=15, min_confidence=0.6, cluster_key="leiden")
    df = res.cluster_summary()
    assert df["cluster"].to_list() == ["2", "9", "10"]  # numeric order
    assert df.columns == [
        "cluster",
        "n_cells",
        "label",
        "label_share",
        "mean_confidence",
        "unassigned_share",
        "label_broad",
        "label_broad_share",
    ]
    rows = {r["cluster"]: r for r in df.iter_rows(named=True)}
    assert rows["9"] == pytest.approx(
        dict(rows["9"], n_cells=20, label="M", label_share=1.0, unassigned_share=0.0)
    )
    t = rows["10"]
    in_t = q.obs["leiden"].to_numpy() == "10"
    given = res.labels[in_t][res.labels[in_t] != "unassigned"]
    names, counts = np.unique(given, return_counts=True)
    expected = names[counts.argmax()] if len(given) else "unassigned"
    assert expected in ("T_a", "T_b") and 0 < t["unassigned_share"] < 1
    assert t["n_cells"] == 20 and t["label"] == expected and t["label_broad"] == "T"
    assert t["unassigned_share"] == pytest.approx((res.labels[in_t] == "unassigned").mean())
    assert t["label_share"] == pytest.approx((res.labels[in_t] == t["label"]).mean())
    assert t["mean_confidence"] == pytest.approx(res.confidence[in_t].mean())
    assert t["label_broad_share"] == 1.0
    back = ad.read_h5ad(res.write(tmp_path / "m.h5ad"))
    assert back.uns["cellvec_clusters"]["label"].tolist() == ["B", "M", t["label"]]
    assert back.uns["cellvec"]["cluster_key"] == "leiden"
    assert res.summary()["clusters"][1]["label"] == "M"
    res.save(fake_store, "run1")
    got = connect_sql(fake_store).query(
        "SELECT cluster, n_cells, label FROM mapping_run1_clusters ORDER BY n_cells, cluster"
    )
    assert got["cluster"].to_list() == ["10", "2", "9"]


def test_cluster_key_through_the_cli(fake_store, tmp_path):
    q = tiny_adata(n_cells=30, seed=5, prefix="q")
    q.obs["leiden"] = q.obs["cell_type"].astype(str)
    path = tmp_path / "q.h5ad"
    q.write_h5ad(path)
    _one_level_atlas(fake_store, "t")
    r = CliRunner()
    args = ["map", str(path), "--store", str(fake_store), "--atlas", "t", "--cluster-key"]
    res = r.invoke(cli, [*args, "leiden", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["cluster_key"] == "leiden"
    assert {c["cluster"]: c["label"] for c in out["clusters"]} == {"B": "B", "M": "M", "T": "T"}
    res = r.invoke(cli, [*args, "leiden"])
    assert res.exit_code == 0 and "majority label" in res.output and "mean conf" in res.output
    res = r.invoke(cli, [*args, "louvain"])
    assert res.exit_code != 0 and "no obs column 'louvain'" in res.output
