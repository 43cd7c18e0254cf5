"""The mixing test: a population the atlas lacks that sits inside a known class."""

import logging

import numpy as np
import pytest

from cellvec.cell_index.build import BuildOptions, build_atlas
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.mixing import mixes, mixing_pvalues, unmixed
from cellvec.cell_index.recipe import Recipe
from helpers import tiny_adata
from servers import Server

FAST = {"steps": 30, "batch_size": 32}


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clusters(rng, centres, sizes, spread):
    codes = np.repeat(np.arange(len(sizes)), sizes)
    return _unit(centres[codes] + rng.normal(0, spread, (len(codes), centres.shape[1]))), codes


def _scene(seed=0, shift=0.0):
    """Three reference classes; the query has them plus a tight population N beside C
    (closer to C's cells than C's own spread), as NK sits beside CD8 T."""
    rng = np.random.default_rng(seed)
    dim = 32
    centres = rng.normal(0, 1, (3, dim))
    ref, ref_codes = _clusters(rng, centres, [300, 200, 250], 0.6)
    query, truth = _clusters(rng, centres, [100, 70, 80], 0.6)
    novel_centre = centres[2] + 0.5 * rng.normal(0, 1, dim)
    novel = _unit(novel_centre + rng.normal(0, 0.3, (40, dim)))
    query = np.vstack([query, novel])
    truth = np.r_[truth, np.full(40, 3)]
    query = _unit(query + shift * rng.normal(0, 1, dim))  # a batch effect moves all the query
    # the vote's answer: the nearest reference class (N is called C)
    chosen = ref_codes[np.argmax(query @ ref.T, axis=1)]
    return ref, ref_codes, query, truth, chosen


def test_a_population_beside_a_known_class_fails_the_mixing_test():
    ref, ref_codes, query, truth, chosen = _scene()
    novel = truth == 3
    assert (chosen[novel] == 2).mean() > 0.9  # mislabelled as its neighbour class
    p = mixing_pvalues(ref, ref_codes, query, chosen)
    assert (p[novel] < 0.01).mean() >= 0.8
    assert (p[~novel] < 0.01).mean() <= 0.03
    assert ((p >= 0) & (p <= 1)).all()
    # the same answer for the same seed, and a sampled pool still finds them
    np.testing.assert_array_equal(p, mixing_pvalues(ref, ref_codes, query, chosen))
    sampled = mixing_pvalues(ref, ref_codes, query, chosen, pool_max=150)
    assert (sampled[novel] < 0.01).mean() >= 0.6


def test_a_query_that_does_not_mix_leaves_the_test_off_with_a_warning(caplog):
    ref, ref_codes, query, truth, chosen = _scene(shift=3.0)
    p = mixing_pvalues(ref, ref_codes, query, chosen)
    assert (p < 0.01).mean() > 0.5  # every query cell keeps to its own kind
    with caplog.at_level(logging.WARNING):
        assert unmixed(p, 0.01, "ref") is None
    assert "do not mix" in caplog.text
    assert not mixes(p, 0.01) and mixes(p, 1e-300)
    mixed = mixing_pvalues(*_scene()[:3], _scene()[4])
    assert unmixed(mixed, 0.01, "ref").sum() == (mixed < 0.01).sum()


def test_map_cells_leaves_a_missing_type_unassigned_by_mixing(fake_store):
    ref = tiny_adata(n_cells=120, seed=1)
    ref = ref[ref.obs["cell_type"] != "M"].copy()
    build_atlas(
        ref,
        store=fake_store,
        name="ref",
        label_key="cell_type",
        options=BuildOptions(refine_options=FAST),
    )
    q = tiny_adata(n_cells=90, seed=9, prefix="q")
    res = map_cells(q, "ref", store=fake_store, min_mixing=0.01)
    novel = (q.obs["cell_type"] == "M").to_numpy()
    assert res.mixing_applied
    assert (res.labels[novel] == "unassigned").mean() >= 0.9
    assert (res.labels[~novel] == "unassigned").mean() <= 0.1
    assert res.summary()["mixing"]["applied"] is True
    assert "cellvec_mixing" in res.to_polars().columns
    assert "cellvec_mixing" in res.to_anndata().obs
    plain = map_cells(q, "ref", store=fake_store)
    assert plain.mixing is None and "mixing" not in plain.summary()
    assert (plain.labels != "unassigned").all()


def test_cli_map_min_mixing_reports_the_test_locally_and_through_a_server(fake_store, tmp_path):
    """The left-out M cells fail the mixing test, and `map --server` finds the same ones."""
    import json

    from click.testing import CliRunner

    from cellvec.cli import cli
    from cellvec.service import create_app

    ref = tiny_adata(n_cells=120, seed=1)
    ref = ref[ref.obs["cell_type"] != "M"].copy()
    build_atlas(
        ref,
        store=fake_store,
        name="ref",
        label_key="cell_type",
        options=BuildOptions(refine_options=FAST),
    )
    q = tmp_path / "q.h5ad"
    tiny_adata(n_cells=90, seed=9, prefix="q").write_h5ad(q)
    base = ["map", str(q), "--store", str(fake_store), "--atlas", "ref", "--min-mixing", "0.01"]
    res = CliRunner().invoke(cli, base)
    assert res.exit_code == 0, res.output
    assert "mixing test: 3" in res.output  # the 30 M cells of 90 (33.3%), none else
    res = CliRunner().invoke(cli, [*base, "--json"])
    local = json.loads(res.stdout)
    assert local["mixing"] == {
        "min_mixing": 0.01,
        "below_fraction": pytest.approx(1 / 3, abs=0.02),
        "applied": True,
    }
    with Server(create_app(fake_store)) as url:
        res = CliRunner().invoke(
            cli,
            ["map", str(q), "--server", url, "--atlas", "ref", "--min-mixing", "0.01", "--json"],
        )
    assert res.exit_code == 0, res.output
    remote = json.loads(res.stdout)
    assert remote["mixing"] == local["mixing"] and remote["label_counts"] == local["label_counts"]


def test_a_disk_atlas_samples_the_same_reference_cells_as_in_memory(fake_store):
    from cellvec.cell_index.atlas import Atlas

    ref = tiny_adata(n_cells=1200, seed=1)
    ref = ref[ref.obs["cell_type"] != "M"].copy()
    for index in ("memory", "disk"):
        build_atlas(
            ref,
            store=fake_store,
            name=index,
            label_key="cell_type",
            recipe=Recipe(top_genes=10, refine="none"),
            options=BuildOptions(index=index),
        )
    mem, disk = Atlas.open(fake_store, "memory"), Atlas.open(fake_store, "disk")
    assert disk.on_disk and not mem.on_disk
    (a, ca), (b, cb) = mem.unrefined_sample(n=300), disk.unrefined_sample(n=300)
    assert len(a) == 300
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(ca, cb)
    q = tiny_adata(n_cells=90, seed=9, prefix="q")
    res = map_cells(q, disk, min_mixing=0.01)
    novel = (q.obs["cell_type"] == "M").to_numpy()
    assert (res.labels[novel] == "unassigned").mean() >= 0.9


def test_the_reliability_plot_draws_the_mixing_calibration(tmp_path):
    from cellvec.report.plots import plot_reliability

    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.9
    path = tmp_path / "reliability.png"
    plot_reliability(rng.random(200), correct, rng.random(200), path, mixing=rng.random(200))
    assert path.stat().st_size > 10_000
    # mixing alone (an atlas without calibration cells) still draws its curves
    plot_reliability(rng.random(200), correct, None, tmp_path / "m.png", mixing=rng.random(200))
    assert (tmp_path / "m.png").stat().st_size > 10_000
