"""Pre-trained priors (`cellvec prior build`, `atlas build --prior`): built from pooled
references, stored as a table the SQL layer shows, an atlas's starting point recorded in
its recipe, and refused where it does not fit."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.build import BuildOptions, build_atlas
from cellvec.cell_index.labels import labels_of
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.prior import build_prior, list_priors, load_prior
from cellvec.cell_index.readers import read_expression
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import HEAD_KEYS, adapted_basis
from cellvec.cell_index.table import list_atlases
from cellvec.errors import CellvecError, StoreError
from helpers import tiny_adata

RECIPE = Recipe(top_genes=10)
FAST = {"steps": 30}  # refinement steps: the tests check plumbing, not accuracy


def _references(*seeds):
    out = []
    for i, seed in enumerate(seeds):
        source = read_expression(tiny_adata(n_cells=60, seed=seed, prefix=f"r{i}_"))
        out.append((f"set{i}", source, labels_of(source, "cell_type")))
    return out


@pytest.fixture
def with_prior(fake_store):
    prior = build_prior(
        _references(3, 4), store=fake_store, name="pbmc", recipe=RECIPE, refine_options=FAST
    )
    return fake_store, prior


def _atlas(store, name, *, prior="pbmc", refine_options=FAST, readout="knn", **recipe):
    return build_atlas(
        tiny_adata(n_cells=24, seed=1),
        store=store,
        name=name,
        label_key="cell_type",
        recipe=Recipe(**{"top_genes": 10, **recipe}),
        options=BuildOptions(readout=readout, prior=prior, refine_options=refine_options),
    )


def test_a_prior_is_a_table_of_its_genes_with_its_sources(with_prior):
    store, prior = with_prior
    assert list_priors(store) == ["pbmc"]
    meta = prior.meta
    assert meta["n_cells"] == 120 and [s["dataset"] for s in meta["sources"]] == ["set0", "set1"]
    # each reference keeps its own classes (pooled, they are kept apart by dataset)
    assert meta["sources"][0]["classes"] == {"B": 20, "M": 20, "T": 20}
    assert meta["refinement"]["n_cells"] == 120 and "history" not in meta["refinement"]
    assert set(prior.head) == set(HEAD_KEYS) and len(prior.gene_rows) == meta["n_genes"] > 0
    assert prior.delta.shape == (len(prior.gene_rows), prior.recipe.dimension)
    loaded = load_prior(store, "pbmc")
    assert loaded.digest == prior.digest and np.array_equal(loaded.gate, prior.gate)
    from cellvec.sql import StoreSQL

    sql = StoreSQL(store)
    try:
        rows = sql.query("SELECT symbol, gate, correction FROM prior_pbmc ORDER BY gate")
    finally:
        sql.close()
    assert rows.height == meta["n_genes"]
    assert rows["gate"][0] == pytest.approx(float(prior.gate.min()))


def test_an_atlas_starts_from_its_prior_and_records_it(with_prior, monkeypatch):
    """With a learning rate of 0 nothing moves from the start: the atlas's head, gates and
    corrections are then the prior's own, so they are what refinement started from."""
    store, prior = with_prior
    still = _atlas(store, "still", refine_options={"steps": 3, "lr": 0.0})
    r = still.encoder().refinement
    for k in HEAD_KEYS:
        np.testing.assert_allclose(r[k], prior.head[k], atol=1e-6)
    at = {int(g): i for i, g in enumerate(prior.gene_rows)}
    seen = np.array([int(g) in at for g in r["gene_rows"]])
    assert seen.all()  # the prior's references measure every gene of this one
    idx = [at[int(g)] for g in r["gene_rows"]]
    np.testing.assert_allclose(r["gene_gate"], prior.gate[idx], rtol=1e-5)
    np.testing.assert_allclose(r["gene_delta"], prior.delta[idx], atol=1e-5)
    assert still.recipe.prior_hash == prior.digest
    assert still.recipe.background_hash == prior.recipe.background_hash  # the prior's
    assert still.meta["refinement"]["prior"]["name"] == "pbmc"
    assert Atlas.describe(store, "still")["prior"] == "pbmc"
    # trained, it moves away from the prior; and a query mapped later through the atlas's
    # saved arrays gets the vectors the atlas was built with (the composition is right)
    moved = _atlas(store, "moved")
    assert moved.recipe.prior_hash == prior.digest
    assert not np.allclose(moved.encoder().refinement["w2"], prior.head["w2"])
    # 8 cells a class: the read-out is chosen by CV, its folds starting from the prior too
    from cellvec.cell_index.prior import Prior

    starts, start = [], Prior.start
    monkeypatch.setattr(Prior, "start", lambda self, *a: starts.append(1) or start(self, *a))
    chosen = _atlas(store, "chosen", readout="auto")
    monkeypatch.undo()
    assert set(chosen.meta["readout_scores"]) == {"refined kNN", "unrefined centroid"}
    assert len(starts) == 3 * 2 + 1  # 3 folds x 2 candidates, then the atlas
    assert chosen.recipe.prior_hash == prior.digest
    ref = tiny_adata(n_cells=24, seed=1)
    res = map_cells(ref, "moved", store=store)
    np.testing.assert_allclose(res.vectors, Atlas.open(store, "moved").vectors, atol=1e-5)
    plain = _atlas(store, "plain", prior=None)
    assert plain.recipe.prior_hash is None and Atlas.describe(store, "plain")["prior"] is None


def test_the_prior_composition_is_the_adapter_applied_on_the_prior():
    """`compose` writes g * ((E + D0) * g0 + D) as (E + D') * g': the form the encoder applies."""
    from cellvec.cell_index.prior import Prior

    rng = np.random.default_rng(0)
    e = rng.normal(size=(7, 4)).astype(np.float32)
    prior = Prior(
        "p",
        Recipe(),
        {},
        np.array([2, 5, 9]),
        rng.uniform(0.5, 2, 3).astype(np.float32),
        rng.normal(size=(3, 4)).astype(np.float32),
        {},
        {},
    )
    rows = np.array([9, 0, 5, 1, 2, 7, 12])  # 0, 1, 7, 12 are not in the prior: the text
    started, g0, d0 = prior.start(e, rows)
    assert np.allclose(g0[[1, 3, 5, 6]], 1) and np.allclose(d0[[1, 3, 5, 6]], 0)
    np.testing.assert_array_equal(g0[[0, 2, 4]], prior.gate[[2, 1, 0]])
    np.testing.assert_allclose(started[0], (e[0] + prior.delta[2]) * prior.gate[2], rtol=1e-6)
    learned = {
        "gene_gate": rng.uniform(0.5, 2, 7).astype(np.float32),
        "gene_delta": rng.normal(size=(7, 4)).astype(np.float32),
    }
    np.testing.assert_allclose(
        adapted_basis(e, prior.compose(learned, g0, d0)),
        adapted_basis(started, learned),
        rtol=1e-5,
        atol=1e-5,
    )


def test_a_prior_that_does_not_fit_is_refused(with_prior):
    store, _ = with_prior
    with pytest.raises(StoreError, match=r"No prior 'nope'.*priors: pbmc.*cellvec prior build"):
        _atlas(store, "a", prior="nope")
    with pytest.raises(StoreError, match=r"No prior '\.\./\.\./etc'"):  # never a path
        _atlas(store, "a", prior="../../etc")
    with pytest.raises(CellvecError, match=r"background: prior 'whiten', atlas 'center'"):
        _atlas(store, "b", background="center")
    with pytest.raises(
        CellvecError, match=r"prior's head maps 64 -> 512 -> 128; this refinement's maps 64 -> 64"
    ):
        _atlas(store, "c", refine_options={**FAST, "hidden": 64})
    with pytest.raises(CellvecError, match="--refine supcon"):
        build_prior(_references(3), store=store, name="x", recipe=Recipe(refine="simclr"))
    with pytest.raises(CellvecError, match="--adapt-genes"):
        build_prior(_references(3), store=store, name="x", recipe=Recipe(adapt_genes=False))
    with pytest.raises(CellvecError, match="Prior name"):
        build_prior(_references(3), store=store, name="../x")
    assert list_atlases(store) == []  # nothing half-built


def test_cli_prior_build_list_and_atlas_build_prior(fake_store, tmp_path):
    from cellvec.cli import cli

    paths = []
    for i, seed in enumerate((3, 4)):
        a = tiny_adata(n_cells=60, seed=seed, prefix=f"r{i}_")
        a.obs = a.obs.rename(columns={"cell_type": ["cell_type", "kind"][i]})
        a.write_h5ad(tmp_path / f"ref{i}.h5ad")
        paths.append(str(tmp_path / f"ref{i}.h5ad"))
    store = ["--store", str(fake_store)]
    runner = CliRunner()
    res = runner.invoke(
        cli, ["prior", "build", *paths, *store, "--name", "p", "--label-key", "cell_type"]
    )
    assert res.exit_code != 0 and "no cell annotation 'cell_type'; obs columns" in res.output
    res = runner.invoke(
        cli,
        ["prior", "build", *paths, *store, "--name", "p", "--top-genes", "10", "--json"]
        + ["--label-key", "cell_type", "--label-key", "kind"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["name"] == "p" and [s["dataset"] for s in out["sources"]] == ["ref0", "ref1"]
    res = runner.invoke(
        cli, ["prior", "build", *paths, *store, "--name", "a b", "--label-key", "cell_type"]
    )
    assert res.exit_code == 1 and "Prior name 'a b'" in res.output
    assert "obs columns" not in res.output  # refused before ref1 (no cell_type) was read
    res = runner.invoke(cli, ["prior", "build", *paths, *store, "--name", "q"])
    assert res.exit_code == 2 and "--label-key" in res.output
    res = runner.invoke(
        cli,
        ["prior", "build", paths[0], *store, "--name", "q", "--label-key", "a", "--label-key", "b"],
    )
    assert res.exit_code == 2 and "one for all or one per reference" in res.output
    res = runner.invoke(cli, ["prior", "list", *store])
    assert res.exit_code == 0 and res.output.startswith("p ") and "ref0 (60)" in res.output
    ref = tmp_path / "few.h5ad"
    tiny_adata(n_cells=24, seed=1).write_h5ad(ref)
    res = runner.invoke(
        cli,
        ["atlas", "build", str(ref), *store, "--name", "few", "--label-key", "cell_type"]
        + ["--top-genes", "10", "--prior", "p", "--readout", "knn"],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["atlas", "list", *store])
    assert "prior=p" in res.output


def test_evaluate_scores_atlases_that_start_from_a_prior(with_prior):
    from cellvec.evaluation.evaluate import evaluate
    from cellvec.evaluation.plan import EvaluationPlan

    store, prior = with_prior
    data = tiny_adata(n_cells=30, seed=1)
    plan = EvaluationPlan(folds=2, refine_options=FAST, prior="pbmc")
    res = evaluate(data, label_key="cell_type", store=store, recipe=RECIPE, plan=plan)
    assert res.recipe["prior_hash"] == prior.digest
    assert 0 <= res.representations["cellvec"]["macro_f1"] <= 1
    with pytest.raises(StoreError, match="No prior 'other'"):
        evaluate(
            data,
            label_key="cell_type",
            store=store,
            plan=EvaluationPlan(folds=2, refine_options=FAST, prior="other"),
        )


def test_pooled_references_are_stored_as_their_files_are():
    """The pooled matrix holds each reference's values under the union of genes, each
    row's columns sorted (ties at the top-N cut follow stored order)."""
    from cellvec.cell_index.prior import pool_sources

    refs = _references(3, 4)
    a, b = refs[0][1], refs[1][1].subset_genes(np.arange(len(refs[1][1].var_names)) % 2 == 0)
    pooled = pool_sources([a, b], ["a", "b"])
    x = pooled.to_csr()
    assert x.has_sorted_indices and pooled.var_names == sorted(a.var_names)
    assert list(pooled.obs["dataset"]) == ["a"] * a.n_obs + ["b"] * b.n_obs
    at = [pooled.var_names.index(g) for g in b.var_names]
    np.testing.assert_array_equal(x[a.n_obs :][:, at].toarray(), b.to_csr().toarray())
    np.testing.assert_array_equal(
        x[: a.n_obs].toarray(), a.to_csr()[:, np.argsort(a.var_names)].toarray()
    )


@pytest.mark.parametrize(
    "tamper, problem",
    [
        (lambda a: a.pop("w2"), "lacks w2"),
        (lambda a: a.update(gene_gate=a["gene_gate"][:-1]), "gates"),
        (lambda a: a["gene_rows"].__setitem__(0, 10**9), "not distinct rows of the gene table"),
        (lambda a: a["gene_gate"].__setitem__(0, 0.0), "not finite positive"),
        (lambda a: a["gene_delta"].__setitem__((0, 0), np.nan), "not finite positive"),
    ],
)
def test_a_tampered_prior_is_refused_with_what_is_wrong(with_prior, tamper, problem):
    """A store is a folder anyone may have edited: a prior whose arrays do not fit together
    is refused, saying what is wrong and to rebuild it, before an atlas starts from it."""
    import json

    from cellvec.cell_index.artifacts import load_artifact, save_artifact
    from cellvec.storage import META_KEY, Store, replace_table

    store, prior = with_prior
    arrays = load_artifact(store, prior.digest)
    tamper(arrays)
    meta = {**prior.meta, "recipe": {**prior.meta["recipe"]}}
    meta["recipe"]["head_hash"] = save_artifact(store, arrays)
    db = Store.of(store)
    table = db.open_table("prior_pbmc").to_arrow()
    replace_table(db.db, "prior_pbmc", table.replace_schema_metadata({META_KEY: json.dumps(meta)}))
    with pytest.raises(StoreError, match=f"Prior 'pbmc' .*{problem}.*cellvec prior build"):
        _atlas(store, "from_tampered")
    assert list_atlases(store) == []
