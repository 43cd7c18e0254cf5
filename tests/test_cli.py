import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from cellvec.cli import cli
from helpers import METRIC_KEYS, tiny_adata


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


@pytest.mark.parametrize("path", list(_commands(cli)), ids=lambda p: " ".join(p))
def test_every_command_has_help_ending_with_an_example(path):
    res = CliRunner().invoke(cli, [*path, "--help"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "Example:" in out and out.rindex("Example:") > out.rindex("--help")
    tail = out[out.rindex("Example:") :].splitlines()[1:]
    assert tail and "cellvec " in tail[0]


def test_each_command_lives_in_a_module_named_for_it():
    """A newcomer finds `cellvec serve` in cli/serve.py, not in a grab-bag module."""
    for name, cmd in cli.commands.items():
        assert cmd.callback.__module__ == f"cellvec.cli.{name}", name


def test_help_is_fast_and_imports_nothing_heavy():
    code = "import sys, cellvec.cli; heavy = [m for m in ('torch', 'sentence_transformers', 'lancedb', 'anndata', 'fastapi', 'umap', 'openai', 'numpy', 'scipy') if m in sys.modules]; print(heavy)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_pipeline_through_the_cli(tmp_path, gene_files):
    r = CliRunner()
    store = str(tmp_path / "store")
    res = r.invoke(
        cli,
        [
            "genes",
            "build",
            "--gene-info",
            str(gene_files["gene_info"]),
            "--gene2go",
            str(gene_files["gene2go"]),
            "--species",
            "human",
            "--model",
            "fake",
            "--store",
            store,
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_genes"] == 30
    res = r.invoke(
        cli,
        [
            "genes",
            "search",
            "--gene",
            "BGENE1",
            "--model",
            "fake",
            "--store",
            store,
            "-k",
            "3",
            "--json",
        ],
    )
    assert res.exit_code == 0 and len(json.loads(res.stdout)["results"]) == 3
    ref, q = tmp_path / "ref.h5ad", tmp_path / "q.h5ad"
    tiny_adata(n_cells=90, seed=1).write_h5ad(ref)
    tiny_adata(n_cells=30, seed=2, prefix="q").write_h5ad(q)
    res = r.invoke(
        cli,
        [
            "atlas",
            "build",
            str(ref),
            "--store",
            store,
            "--name",
            "tiny",
            "--label-key",
            "cell_type",
            "--top-genes",
            "10",
            "--subset",
            "batch=a,b",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = tmp_path / "mapped.h5ad"
    res = r.invoke(
        cli,
        [
            "map",
            str(q),
            "--store",
            store,
            "--atlas",
            "tiny",
            "--out",
            str(out),
            "--truth-key",
            "cell_type",
            "--table",
            str(tmp_path / "t.parquet"),
            "--save-as",
            "q",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    m = json.loads(res.stdout)
    assert set(m) >= METRIC_KEYS
    assert m["accuracy"] == 1.0 and out.exists() and (tmp_path / "t.parquet").exists()
    res = r.invoke(
        cli, ["sql", "SELECT count(*) AS n FROM mapping_q", "--store", store, "--format", "csv"]
    )
    assert res.exit_code == 0 and res.stdout.splitlines() == ["n", "30"]
    res = r.invoke(
        cli,
        [
            "evaluate",
            str(ref),
            "--label-key",
            "cell_type",
            "--store",
            store,
            "--folds",
            "3",
            "--top-genes",
            "10",
            "--baselines",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    reps = json.loads(res.stdout)["representations"]
    assert {"pca_knn", "logreg_expr", "naive_mean", "graph_baseline", "cellvec"} <= set(reps)
    evaluate = ["evaluate", str(ref), "--label-key", "cell_type", "--store", store]
    res = r.invoke(cli, [*evaluate, "--folds", "1"])
    assert res.exit_code == 2 and "one fold leaves no cells to train on" in res.output
    res = r.invoke(cli, [*evaluate, "--folds", "0"])
    assert res.exit_code == 2 and "add --query FILE" in res.output
    res = r.invoke(
        cli, [*evaluate, "--folds", "0", "--query", str(q), "--top-genes", "10", "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["transfer"]["cellvec"]["accuracy"] == 1.0 and not out["representations"]
    res = r.invoke(cli, ["atlas", "list", "--store", store])
    assert "tiny" in res.output and "top10" in res.output and "+cross-species view" in res.output
    assert "__species" not in res.output  # the view is the atlas's, not an atlas of its own
    res = r.invoke(
        cli, ["explain", str(ref), "--store", store, "--atlas", "tiny", "--subtype", "T", "--json"]
    )
    assert res.exit_code == 0, res.output
    drivers = [d["symbol"] for d in json.loads(res.stdout)["drivers"]]
    assert drivers and all(s.startswith("T") for s in drivers[:5])
    scores = tmp_path / "scores.csv"
    scores.write_text("T,0.9\nB,0.5\nM,0.1\n")
    res = r.invoke(
        cli,
        [
            "explain",
            str(ref),
            "--store",
            store,
            "--atlas",
            "tiny",
            "--scores",
            str(scores),
            "--out",
            str(tmp_path / "cells.csv"),
            "--json",
        ],
    )
    assert res.exit_code == 0 and json.loads(res.stdout)["pearson_r"] > 0.9
    assert (tmp_path / "cells.csv").read_text().count("\n") > 1  # a header and its cells
    explain = ["explain", str(ref), "--store", store, "--atlas", "tiny", "--scores", str(scores)]
    tsv = tmp_path / "new" / "cells.TSV"  # any case; its folder made
    res = r.invoke(cli, [*explain, "--out", str(tsv)])
    assert res.exit_code == 0, res.output
    assert tsv.read_text().splitlines()[0].count("\t") >= 1
    res = r.invoke(cli, [*explain, "--out", str(tmp_path / "cells.txt")])
    assert (
        res.exit_code == 1 and "name the output for its format: .parquet, .csv, .tsv" in res.output
    )


def test_loading_faiss_logs_no_info_lines(tmp_path, fake_store):
    """faiss.loader says 'Could not load library with AVX2 support' at INFO: not for users."""
    from cellvec.cell_index.build import build_atlas

    build_atlas(tiny_adata(seed=1), store=fake_store, name="tiny", label_key="cell_type")
    q = tmp_path / "q.h5ad"
    tiny_adata(n_cells=9, seed=2).write_h5ad(q)
    cmd = [sys.executable, "-c", "from cellvec.cli import main; main()"]
    res = subprocess.run(
        [*cmd, "map", str(q), "--store", str(fake_store), "--atlas", "tiny"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "INFO cellvec.cell_index.mapping: Mapped 9 cells" in res.stderr  # INFO is shown
    assert "faiss.loader" not in res.stderr and "AVX2" not in res.stderr, res.stderr


def test_errors_are_one_line_with_a_fix(tmp_path, fake_store):
    r = CliRunner()
    res = r.invoke(
        cli,
        [
            "genes",
            "build",
            "--gene-info",
            __file__,
            "--species",
            "human",
            "--model",
            "fake",
            "--store",
            str(tmp_path / "s"),
        ],
    )
    assert (
        res.exit_code == 1
        and "is not an NCBI gene_info file" in res.output
        and "Traceback" not in res.output
    )
    res = r.invoke(cli, ["genes", "search", "x", "--store", str(fake_store), "--model", "gpt9"])
    assert res.exit_code == 1 and "no complete table for model 'gpt9'" in res.output
    res = r.invoke(
        cli,
        [
            "genes",
            "build",
            "--gene-info",
            __file__,
            "--species",
            "human",
            "--model",
            "bert",
            "--store",
            str(tmp_path / "s"),
        ],
    )
    assert "Unknown embedding model 'bert'" in res.output
    q = tmp_path / "q.h5ad"
    tiny_adata().write_h5ad(q)
    res = r.invoke(cli, ["map", str(q), "--store", str(fake_store), "--atlas", "none"])
    assert res.exit_code == 1 and "No atlas 'none'" in res.output
    res = r.invoke(
        cli,
        [
            "atlas",
            "build",
            str(q),
            "--store",
            str(fake_store),
            "--name",
            "x",
            "--label-key",
            "cell_type",
            "--subset",
            "donor=3pv1",
        ],
    )
    assert res.exit_code == 2 and "COLUMN=V1,V2" in res.output


def test_atlas_build_level_shift_is_bounded_and_recorded(tmp_path, fake_store):
    from cellvec.cell_index.atlas import Atlas

    ref = tmp_path / "ref.h5ad"
    tiny_adata(n_cells=90, seed=1).write_h5ad(ref)
    build = ["atlas", "build", str(ref), "--store", str(fake_store), "--label-key", "cell_type"]
    r = CliRunner()
    res = r.invoke(cli, [*build, "--name", "far", "--level-shift", "5"])
    assert res.exit_code == 2 and "--level-shift" in res.output and "0.0<=x<=3.0" in res.output
    res = r.invoke(cli, [*build, "--name", "shifted", "--top-genes", "10", "--level-shift", "1"])
    assert res.exit_code == 0, res.output
    assert Atlas.open(str(fake_store), "shifted").meta["refinement"]["level_shift"] == 1.0


def test_transpose_and_gene_column_from_the_cli(tmp_path, fake_store):
    import pandas as pd

    a = tiny_adata(n_cells=60, seed=1)
    df = pd.DataFrame(a.X.toarray(), index=a.obs_names, columns=a.var_names).T  # genes x cells
    path = tmp_path / "genes_by_cells.tsv"
    df.to_csv(path, sep="\t")
    r = CliRunner()
    h5 = tmp_path / "a.h5ad"
    a.write_h5ad(h5)
    assert (
        r.invoke(
            cli,
            [
                "atlas",
                "build",
                str(h5),
                "--store",
                str(fake_store),
                "--name",
                "tiny",
                "--label-key",
                "cell_type",
                "--top-genes",
                "10",
            ],
        ).exit_code
        == 0
    )
    res = r.invoke(
        cli,
        ["map", str(path), "--store", str(fake_store), "--atlas", "tiny", "--transpose", "--json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_cells"] == 60
    res = r.invoke(
        cli,
        [
            "atlas",
            "build",
            str(h5),
            "--store",
            str(fake_store),
            "--name",
            "t",
            "--label-key",
            "cell_type",
            "--gene-column",
            "symbol",
        ],
    )
    assert res.exit_code == 1 and "no var column 'symbol'" in res.output
