import numpy as np
import pytest
import scipy.sparse as sp

from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.build import build_atlas
from cellvec.cell_index.knn import IVFIndex, exact_knn
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.vectors import top_n_weights
from cellvec.errors import CellvecError, GeneMatchError, InputFormatError, RecipeMismatchError
from cellvec.gene_store import GeneStore
from cellvec.gene_store.resolve import match_genes
from helpers import build_centroid_atlas, centroid_scores, tiny_adata


def _reference_top_n(x: np.ndarray, n: int, weighting: str) -> np.ndarray:
    """A plain per-row implementation to check the vectorised one against."""
    out = np.zeros_like(x, dtype=np.float64)
    for i, row in enumerate(x):
        nz = np.flatnonzero(row)
        top = nz[np.argsort(-row[nz], kind="stable")][:n]
        if len(top) == 0:
            continue
        vals = row[top].astype(np.float64)
        if weighting == "log1p":
            vals = np.log1p(vals)
        elif weighting == "rank":
            vals = (n - np.arange(len(top))) / n
        elif weighting == "softmax":
            vals = np.exp(vals - vals.max())
        elif weighting == "sqrt":  # the square root of softmax's weights
            vals = np.sqrt(np.exp(vals - vals.max()))
        out[i, top] = vals / vals.sum() if vals.sum() > 0 else 0
    return out


@pytest.mark.parametrize("weighting", ["value", "log1p", "rank", "softmax", "sqrt"])
@pytest.mark.parametrize("n", [1, 3, 50])
def test_top_n_weights_match_per_row_reference(weighting, n):
    rng = np.random.default_rng(1)
    x = rng.random((40, 25)) * (rng.random((40, 25)) < 0.4)
    x[7] = 0
    got = top_n_weights(sp.csr_matrix(x), n, weighting).toarray()
    np.testing.assert_allclose(got, _reference_top_n(x, n, weighting), atol=1e-6)


def test_atlas_map_roundtrip(fake_store, tmp_path):
    ref = tiny_adata(n_cells=90, seed=1)
    query = tiny_adata(n_cells=30, seed=2, prefix="q")
    atlas = build_atlas(
        ref,
        store=fake_store,
        name="tiny",
        label_key="cell_type",
        batch_key="batch",
        recipe=Recipe(top_genes=10),
    )
    assert (
        atlas.recipe.model == "fake"
        and atlas.recipe.top_genes == 10
        and atlas.recipe.background_hash
    )
    assert atlas.meta["classes"] == {"B": 30, "M": 30, "T": 30}
    res = map_cells(query, "tiny", store=fake_store, truth_key="cell_type", k=5)
    assert res.metrics["accuracy"] == 1.0 and res.metrics["macro_f1"] == 1.0
    assert set(res.metrics["per_class"]) == {"B", "M", "T"} and res.metrics["n_cells"] == 30
    assert np.all((res.confidence > 0) & (res.confidence <= 1))
    np.testing.assert_allclose(res.scores.sum(1), 1, atol=1e-9)
    out = res.write(tmp_path / "mapped.h5ad")
    import anndata as ad

    back = ad.read_h5ad(out)
    assert list(back.obs["cellvec_label"].astype(str)) == list(res.labels)
    assert back.obsm["X_cellvec"].shape == (30, atlas.vectors.shape[1])
    df = res.to_polars()
    assert {"cell_id", "cellvec_label", "cellvec_confidence", "truth", "score_T"} <= set(df.columns)
    res.write(tmp_path / "mapped.csv")
    assert (tmp_path / "mapped.csv").read_text().startswith("cell_id,cellvec_label")


def test_unassigned_below_min_confidence(fake_store):
    ref = tiny_adata(n_cells=90, seed=1)
    build_atlas(
        ref,
        store=fake_store,
        name="tiny",
        label_key="cell_type",
        recipe=Recipe(top_genes=10, refine="none"),
    )
    q = tiny_adata(n_cells=30, seed=3, prefix="q")
    x = q.X.toarray()
    x[:10, :20] = 10  # ten cells express T and B genes alike: their votes split
    q.X = sp.csr_matrix(x)
    free = map_cells(q, "tiny", store=fake_store, k=30)
    threshold = float(free.confidence.min() + free.confidence.max()) / 2
    assert free.confidence.min() < threshold < free.confidence.max()
    res = map_cells(q, "tiny", store=fake_store, k=30, min_confidence=threshold)
    low = free.confidence < threshold
    assert (res.labels[low] == "unassigned").all()
    assert (res.labels[~low] == free.labels[~low]).all()
    assert res.summary()["unassigned_fraction"] == pytest.approx(low.mean())


def test_recipe_mismatch_is_refused(fake_store):
    build_atlas(
        tiny_adata(n_cells=60),
        store=fake_store,
        name="tiny",
        label_key="cell_type",
        recipe=Recipe(top_genes=10),
    )
    with pytest.raises(
        RecipeMismatchError, match=r"top_genes: atlas 10 vs query 50.*rebuild the atlas"
    ):
        map_cells(tiny_adata(n_cells=9), "tiny", store=fake_store, recipe={"top_genes": 50})
    r = Recipe(top_genes=10, weighting="rank")
    assert "weighting: atlas 'value' vs query 'rank'" in Recipe(top_genes=10).differences(r)[0]


def test_changed_gene_store_is_refused(fake_store, gene_files):
    from cellvec.errors import StoreError
    from cellvec.gene_store import build_gene_store
    from helpers import FakeEmbedder

    build_atlas(tiny_adata(n_cells=60), store=fake_store, name="tiny", label_key="cell_type")
    build_gene_store(
        gene_files["gene_info"], store=fake_store, species="human", embedder=FakeEmbedder()
    )  # no GO now
    with pytest.raises(StoreError, match="another version of the fake gene table"):
        map_cells(tiny_adata(n_cells=9), "tiny", store=fake_store)


def test_bad_inputs(fake_store):
    with pytest.raises(
        InputFormatError, match="no cell annotation 'celltype'.*cell_type.*--label-key"
    ):
        build_atlas(tiny_adata(), store=fake_store, name="x", label_key="celltype")
    with pytest.raises(CellvecError, match="letters, digits and underscores"):
        build_atlas(tiny_adata(), store=fake_store, name="my atlas", label_key="cell_type")
    with pytest.raises(CellvecError, match="Unknown weighting 'tfidf'"):
        build_atlas(
            tiny_adata(),
            store=fake_store,
            name="x",
            label_key="cell_type",
            recipe=Recipe(weighting="tfidf"),
        )
    from cellvec.errors import StoreError

    with pytest.raises(StoreError, match=r"No atlas 'nope'.*cellvec atlas build"):
        map_cells(tiny_adata(), "nope", store=fake_store)


def test_too_few_genes_names_the_cause(fake_store):
    a = tiny_adata()
    a.var_names = [f"ENSMUSG{i:011d}" for i in range(a.n_vars)]
    with pytest.raises(GeneMatchError, match=r"only 0 of 30 genes.*Ensembl ids"):
        build_atlas(a, store=fake_store, name="x", label_key="cell_type")
    a.var_names = [f"Gene{i}" for i in range(a.n_vars)]
    with pytest.raises(GeneMatchError, match="look like mouse symbols.*store is human"):
        build_atlas(a, store=fake_store, name="x", label_key="cell_type")


def test_genes_matched_by_synonym_and_ensembl(fake_store):
    a = tiny_adata()
    names = list(a.var_names)
    names[0] = "TALIAS0"  # synonym
    names[1] = "ENSG00000001002.4"  # Ensembl id with version (gene id 1002 = TGENE1)
    names[2] = "tgene2"  # case
    a.var_names = names
    atlas = build_atlas(a, store=fake_store, name="syn", label_key="cell_type")
    assert atlas.meta["n_cells"] == 60
    m = match_genes(names, GeneStore(fake_store).load("fake").genes)
    assert m.n_matched == 30
    assert m.how[:3] == ["synonym", "ensembl", "symbol (case)"]


def test_rebuild_overwrites_atomically(fake_store, monkeypatch):
    """A rebuild replaces the atlas in one commit: one that dies while its table is being
    written leaves the old atlas as it was, and an atlas opened before a rebuild goes on
    reading the version it opened; a rebuild that completes is read whole."""
    import pyarrow as pa

    import cellvec.cell_index.build as build_mod

    build_atlas(tiny_adata(n_cells=60), store=fake_store, name="tiny", label_key="cell_type")
    old = Atlas.open(fake_store, "tiny")
    v1, vectors, ids = old.version, old.vectors.copy(), old.cell_ids.copy()
    query = tiny_adata(n_cells=9, seed=2, prefix="q")
    labels = map_cells(query, "tiny", store=fake_store).labels
    write = build_mod.replace_table

    def dies_midway(db, name, table):  # the first rows reach the disk, then the writer dies
        def batches():
            yield table.slice(0, 30).to_batches()[0]
            raise OSError("disk full")

        return write(db, name, pa.RecordBatchReader.from_batches(table.schema, batches()))

    monkeypatch.setattr(build_mod, "replace_table", dies_midway)
    with pytest.raises((OSError, RuntimeError), match="disk full"):
        build_atlas(
            tiny_adata(n_cells=90, seed=5), store=fake_store, name="tiny", label_key="cell_type"
        )
    monkeypatch.undo()
    after = Atlas.open(fake_store, "tiny")
    assert after.version == v1 and after.n_cells == 60
    np.testing.assert_array_equal(after.vectors, vectors)
    np.testing.assert_array_equal(after.cell_ids, ids)
    np.testing.assert_array_equal(map_cells(query, "tiny", store=fake_store).labels, labels)

    build_atlas(
        tiny_adata(n_cells=90, seed=5), store=fake_store, name="tiny", label_key="cell_type"
    )
    new = Atlas.open(fake_store, "tiny")
    assert new.version > v1 and len(new.vectors) == len(new.cell_ids) == new.n_cells == 90
    # opened before the rebuild, read after it: the old version's rows, all of them
    assert old.dataset().version == v1 and old.weights().shape[0] == 60


def test_ivf_neighbours_match_exact_search():
    """faiss-contrib style: ANN neighbours against exact KNN on clustered unit vectors."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32))
    ref = centres[rng.integers(0, 50, 60_000)] + 0.35 * rng.normal(size=(60_000, 32))
    ref = (ref / np.linalg.norm(ref, axis=1, keepdims=True)).astype(np.float32)
    q = centres[rng.integers(0, 50, 500)] + 0.35 * rng.normal(size=(500, 32))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    k = 15
    ei, es = exact_knn(q, ref, k)
    ai, asim = IVFIndex(ref).search(q, k)
    recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(ai, ei)])
    assert recall >= 0.97
    # tie-aware: every ANN neighbour is at least as similar as the exact k-th neighbour (within float error)
    assert np.mean(asim[:, -1] >= es[:, -1] - 1e-5) >= 0.95
    np.testing.assert_allclose(es, np.sort(q @ ref.T, axis=1)[:, ::-1][:, :k], atol=1e-5)


def test_cells_without_labels_are_excluded_and_label_maps_rename_truth(fake_store):
    a = tiny_adata(n_cells=60, seed=1)
    a.obs["cell_type"] = a.obs["cell_type"].cat.add_categories([""])
    a.obs.iloc[0, a.obs.columns.get_loc("cell_type")] = None
    a.obs.iloc[1, a.obs.columns.get_loc("cell_type")] = ""
    atlas = build_atlas(
        a, store=fake_store, name="tiny", label_key="cell_type", recipe=Recipe(top_genes=10)
    )
    assert atlas.meta["n_cells"] == 58 and set(atlas.classes) == {"B", "M", "T"}
    q = tiny_adata(n_cells=30, seed=2, prefix="q")
    q.obs["cell_type"] = q.obs["cell_type"].cat.rename_categories({"T": "T cell"})
    plain = map_cells(q, "tiny", store=fake_store, truth_key="cell_type")
    assert "T cell" in plain.metrics["per_class"] and plain.metrics["accuracy"] < 1.0
    mapped = map_cells(
        q, "tiny", store=fake_store, truth_key="cell_type", label_map={"T cell": "T"}
    )
    assert mapped.metrics["accuracy"] == 1.0 and "T cell" not in mapped.metrics["per_class"]


def test_centroid_readout_labels_each_cell_by_its_nearest_class_centroid(fake_store, monkeypatch):
    """An atlas read by centroids gives each cell the class whose mean reference vector
    (made unit length) is most similar, with scores from the similarity to each centroid
    (not the neighbours' vote), also over a query's panel (fitted once per panel), and
    never an excluded label."""
    from cellvec.cell_index.calls import MapOptions, Prototypes
    from cellvec.cell_index.mapping import Reference
    from cellvec.cell_index.readers import read_expression

    atlas = build_centroid_atlas(fake_store)
    assert atlas.meta["readout"] == "centroid" and "readout_scores" not in atlas.meta
    query = tiny_adata(n_cells=30, seed=2, prefix="q")
    res = map_cells(query, "few", store=fake_store)
    classes = np.unique(atlas.labels)
    cent = np.stack([atlas.vectors[atlas.labels == c].mean(0) for c in classes])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    expected = classes[(res.vectors @ cent.T).argmax(1)]
    assert list(res.labels) == list(expected)
    assert (expected == query.obs["cell_type"].astype(str).to_numpy()).mean() > 0.9
    # the scores are a softmax of the centroids' similarities at the atlas's temperature
    codes = np.searchsorted(classes, atlas.labels.astype(str))
    t = Prototypes.of(atlas.vectors, codes, len(classes)).temperature
    z = (res.vectors @ cent.T) / t
    e = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(res.scores, e / e.sum(1, keepdims=True), atol=1e-5)
    # a query of fewer genes: the centroids of the reference re-aggregated over its panel
    panel_query = query[:, ::2].copy()
    plan = Reference.of(atlas).plan(list(panel_query.var_names))
    assert plan.panel is not None
    on_panel = map_cells(panel_query, "few", store=fake_store)
    over = atlas.vectors_over(plan.panel)[0]
    np.testing.assert_allclose(
        on_panel.scores, centroid_scores(atlas, on_panel.vectors, over=over), atol=1e-5
    )
    # a reference held open (as the service holds it) fits each panel's centroids once
    fitted, real_of = [], Prototypes.of
    monkeypatch.setattr(Prototypes, "of", lambda *a: fitted.append(1) or real_of(*a))
    held = Reference.of(atlas)
    for _ in range(3):
        held.call(read_expression(panel_query), MapOptions())
    assert len(fitted) == 1
    monkeypatch.undo()
    blocked = map_cells(query, "few", store=fake_store, exclude_labels=["B"])
    assert "B" not in set(blocked.labels)
    kept = expected != "B"
    assert list(blocked.labels[kept]) == list(expected[kept])


def test_small_reference_chooses_its_readout_by_cross_validation(fake_store, caplog, monkeypatch):
    """With a median class under 20 cells, `atlas build` scores the refined kNN and the
    unrefined centroids by 3-fold CV on the reference, keeps the better (ties to the
    refined kNN), and records the scores and the choice; a larger reference, or an
    explicit read-out, is built as asked with no CV."""
    import logging

    import cellvec.cell_index.tune as tune
    from cellvec.cell_index.build import BuildOptions
    from cellvec.cell_index.tune import READOUT_CANDIDATES

    def build(name, n_cells=24, **options):  # 24 cells: 8 a class
        return build_atlas(
            tiny_adata(n_cells=n_cells, seed=1),
            store=fake_store,
            name=name,
            label_key="cell_type",
            recipe=Recipe(top_genes=10),
            options=BuildOptions(**options),
        )

    with caplog.at_level(logging.INFO, logger="cellvec.cell_index.tune"):
        atlas = build("few")
    scores = atlas.meta["readout_scores"]
    assert set(scores) == set(READOUT_CANDIDATES) and all(0 <= v <= 1 for v in scores.values())
    best = max(scores, key=lambda c: (scores[c], c == "refined kNN"))
    changes, readout = READOUT_CANDIDATES[best]
    assert atlas.meta["readout"] == readout
    assert atlas.recipe.refine == changes.get("refine", "supcon")
    assert "chose the " + best in caplog.text
    assert Atlas.describe(fake_store, "few")["readout"] == readout
    explicit = build("few_knn", readout="knn")
    assert explicit.meta["readout"] == "knn" and explicit.recipe.refine == "supcon"
    assert "readout_scores" not in explicit.meta
    large = build("large", n_cells=60)  # 20 cells a class: not small
    assert large.meta["readout"] == "knn" and "readout_scores" not in large.meta
    # where the centroids score better (here: the refined vote's inner calls spoiled), the
    # atlas is built unrefined, records the centroid read-out and maps by it
    real_map = tune.map_cells

    def spoiled_vote(query, atlas, **kw):
        res = real_map(query, atlas, **kw)
        if atlas.meta["readout"] == "knn":
            res.labels[:] = atlas.labels[0]
        return res

    monkeypatch.setattr(tune, "map_cells", spoiled_vote)
    chosen = build("few_centroid")
    monkeypatch.undo()
    scores = chosen.meta["readout_scores"]
    assert scores["unrefined centroid"] > scores["refined kNN"]
    assert chosen.meta["readout"] == "centroid" and chosen.recipe.refine == "none"
    assert not chosen.recipe.adapt_genes
    mapped = map_cells(tiny_adata(n_cells=12, seed=5, prefix="q"), "few_centroid", store=fake_store)
    np.testing.assert_allclose(mapped.scores, centroid_scores(chosen, mapped.vectors), atol=1e-5)
    with pytest.raises(CellvecError, match="Read-out 'vote'"):
        build("bad", readout="vote")


def test_tiny_classes_cross_validate_with_fewer_folds_or_say_why_not(fake_store, caplog):
    """Two cells a class still choose the read-out, by 2-fold CV; one cell a class cannot
    be cross-validated: the atlas keeps the refined kNN and the log says so and how to
    choose by hand."""
    import logging

    with caplog.at_level(logging.INFO, logger="cellvec.cell_index.tune"):
        two = build_atlas(
            tiny_adata(n_cells=6, seed=1), store=fake_store, name="two", label_key="cell_type"
        )
    assert set(two.meta["readout_scores"]) == {"refined kNN", "unrefined centroid"}
    assert "by 2-fold CV" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cellvec.cell_index.tune"):
        one = build_atlas(
            tiny_adata(n_cells=3, seed=1), store=fake_store, name="one", label_key="cell_type"
        )
    assert one.meta["readout"] == "knn" and "readout_scores" not in one.meta
    assert "no class has two cells" in caplog.text and "--readout" in caplog.text


def test_an_atlas_read_some_unknown_way_is_refused(fake_store):
    """A bundle or a newer cellvec's atlas that names an unknown read-out is listed as it
    is, and refused with the fix when mapped, never read by the vote in silence."""
    from cellvec.cell_index.atlas import atlas_summary
    from cellvec.cell_index.mapping import Reference

    atlas = build_centroid_atlas(fake_store)
    atlas.meta["readout"] = "prototypes-v2"
    assert atlas_summary("few", atlas.meta, 30)["readout"] == "prototypes-v2"
    with pytest.raises(CellvecError, match="'prototypes-v2'.*upgrade cellvec, or rebuild"):
        map_cells(tiny_adata(n_cells=6, seed=2, prefix="q"), Reference.of(atlas))


def test_prototype_temperature_is_fitted_on_the_reference_with_each_cell_left_out():
    """The centroid read-out's temperature is the grid value with the lowest negative
    log-likelihood of the reference labels, each cell scored against its own class's
    centroid without itself; a one-cell class is left out of the fit. Tight classes get
    a low temperature (confident scores), overlapping ones a higher one."""
    from cellvec.cell_index.calls import TEMPERATURES, Prototypes

    rng = np.random.default_rng(0)

    def cells(spread):
        centres = np.eye(4, 16) * 3
        codes = np.repeat(np.arange(4), 8)
        v = centres[codes] + rng.normal(scale=spread, size=(32, 16))
        v = np.vstack([v, rng.normal(size=(1, 16))])  # a one-cell class
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v, np.append(codes, 4)

    def brute_force(v, codes):
        best = None
        for t in TEMPERATURES:
            nll = 0.0
            for i in np.flatnonzero(codes < 4):
                cent = np.stack(
                    [v[(codes == k) & (np.arange(len(v)) != i)].sum(0) for k in range(5)]
                )
                cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
                z = v[i] @ cent.T / t
                nll -= z[codes[i]] - np.log(np.exp(z - z.max()).sum()) - z.max()
            if best is None or nll < best[0] - 1e-9:
                best = (nll, t)
        return best[1]

    tight, loose = cells(0.3), cells(2.0)
    t_tight = Prototypes.of(*tight, 5).temperature
    t_loose = Prototypes.of(*loose, 5).temperature
    assert t_tight == pytest.approx(brute_force(*tight))
    assert t_loose == pytest.approx(brute_force(*loose))
    assert t_tight < t_loose
    p = Prototypes.of(*tight, 5)
    scores = p.scores(tight[0][:4], np.array([True, False, True, True, True]))
    np.testing.assert_allclose(scores.sum(1), 1)
    assert (scores[:, 1] == 0).all()


def test_skipped_ribosomal_genes_carry_no_weight_in_the_atlas_or_a_query(tmp_path):
    """With the default recipe (skip_genes=ribosomal) the atlas's gene list leaves the
    ribosomal proteins out, so however much of them a query shows, its vectors do not
    move; a recipe that keeps them is moved. Other genes named "ribosomal protein" stay.
    (Log-normalised input: from counts, a gene still counts in its cell's library size.)"""
    import anndata as ad

    from helpers import tiny_genes, tiny_store

    extra = [
        {"id": 9001, "symbol": "RPL3", "name": "ribosomal protein L3"},
        {"id": 9002, "symbol": "MRPL1", "name": "mitochondrial ribosomal protein L1"},
        {"id": 9003, "symbol": "RPS6KA1", "name": "ribosomal protein S6 kinase A1"},
    ]
    for g in extra:
        g.update(
            syn="-",
            ens=f"ENSG{g['id']:011d}",
            proc="translation",
            comp="ribosome",
            func="structural constituent of ribosome",
        )
    store = tiny_store(tmp_path, tiny_genes() + extra)

    def with_extra(a, rpl3_scale=1.0):
        rng = np.random.default_rng(5)
        more = np.log1p(rng.poisson(6, size=(a.n_obs, len(extra)))).astype(np.float32)
        more[:, 0] *= rpl3_scale
        x = sp.hstack([a.X, sp.csr_matrix(more)], format="csr")
        return ad.AnnData(
            x, obs=a.obs, var=a.var.reindex(list(a.var_names) + [g["symbol"] for g in extra])
        )

    ref = with_extra(tiny_adata(n_cells=90, seed=1, counts=False))
    query = tiny_adata(n_cells=30, seed=2, prefix="q", counts=False)
    vectors = {}
    for skip in ("ribosomal", "none"):
        atlas = build_atlas(
            ref,
            store=store,
            name=f"skip_{skip}",
            label_key="cell_type",
            recipe=Recipe(top_genes=20, skip_genes=skip),
        )
        assert atlas.recipe.skip_genes == skip
        enc = atlas.encoder()
        kept = set(enc.genes.genes["symbol"].to_numpy()[enc.refinement["gene_rows"]])
        assert {"MRPL1", "RPS6KA1"} <= kept and ("RPL3" in kept) == (skip == "none")
        vectors[skip] = [map_cells(with_extra(query, scale), atlas).vectors for scale in (1.0, 3.0)]
    np.testing.assert_array_equal(*vectors["ribosomal"])
    assert np.abs(vectors["none"][0] - vectors["none"][1]).max() > 1e-3


def test_an_atlas_recipe_from_before_skip_genes_kept_every_gene():
    old = {k: v for k, v in Recipe().to_dict().items() if k != "skip_genes"}
    assert Recipe.from_dict(old).skip_genes == "none" and Recipe().skip_genes == "ribosomal"
    with pytest.raises(CellvecError, match="Unknown skip_genes"):
        Recipe(skip_genes="mitochondria")


def test_a_store_without_ncbi_names_says_it_cannot_skip_the_ribosomal_genes(tmp_path, caplog):
    import logging
    import pickle

    from cellvec.gene_store import import_vectors
    from helpers import tiny_genes

    rng = np.random.default_rng(0)
    path = tmp_path / "vectors.pickle"
    path.write_bytes(pickle.dumps({g["symbol"]: rng.normal(size=8).tolist() for g in tiny_genes()}))
    import_vectors(path, store=tmp_path / "store", model="plain")  # no gene_info: no names
    with caplog.at_level(logging.WARNING, logger="cellvec.cell_index.fitting"):
        atlas = build_atlas(
            tiny_adata(n_cells=30, seed=1),
            store=tmp_path / "store",
            name="plain",
            label_key="cell_type",
            model="precomputed:plain",
            recipe=Recipe(top_genes=10, refine="none"),
        )
    assert atlas.recipe.skip_genes == "ribosomal"
    assert "no NCBI full names" in caplog.text and "--gene-info" in caplog.text
