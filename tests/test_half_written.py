"""Bad input gets one line naming the file, the problem and the fix, and a command that
fails or is interrupted (Ctrl-C, simulated by raising KeyboardInterrupt where the write
happens) leaves nothing half-written: outputs, reports, bundles, atlas tables. Each test
fails without its fix (a review of the CLI found each by probing it)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from cellvec.cli import cli
from cellvec.errors import InputFormatError
from cellvec.storage import Store
from helpers import build_tiny_atlas, tiny_adata


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(res, *words):
    """A click error (usage or ClickException: exit code 1 or 2, one message), not a crash."""
    assert res.exit_code in (1, 2), res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert all(w in res.output for w in words), res.output


def _interrupted(res):
    """Stopped by the KeyboardInterrupt a test raised (click: "Aborted!"), not a crash."""
    assert res.exit_code == 1 and "Aborted!" in res.output, (res.output, res.exception)


@pytest.fixture
def mapped(tmp_path, fake_store):
    """The tiny atlas, a query file, and that query mapped to an .h5ad."""
    build_tiny_atlas(fake_store)
    q = tmp_path / "q.h5ad"
    tiny_adata(n_cells=20, seed=4, prefix="q").write_h5ad(q)
    out = tmp_path / "m.h5ad"
    res = _run("map", q, "--store", fake_store, "--atlas", "tiny", "--out", out)
    assert res.exit_code == 0, res.output
    return fake_store, q, out


def test_a_store_path_that_is_a_file_is_named(tmp_path, mapped):
    _, q, _ = mapped
    for args in (
        ["map", q, "--atlas", "tiny"],
        ["atlas", "list"],
        ["genes", "search", "x"],
    ):
        _one_line_error(_run(*args, "--store", q), f"{q} is a file, not a store folder")


def test_an_output_may_not_overwrite_the_query(mapped):
    store, q, out = mapped
    before = q.read_bytes()
    _one_line_error(_run("map", q, "--store", store, "--atlas", "tiny", "--out", q), "is the query")
    table = out.with_suffix(".csv")
    res = _run("map", q, "--store", store, "--atlas", "tiny", "--out", table, "--table", table)
    _one_line_error(res, "both name")
    assert q.read_bytes() == before


def test_an_interrupted_output_leaves_no_temporary_file(mapped, monkeypatch):
    import anndata as ad
    import polars as pl

    store, q, out = mapped
    before = out.read_bytes()

    def half_written(self, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    for suffix, cls, method in (
        (".h5ad", ad.AnnData, "write_h5ad"),
        (".parquet", pl.DataFrame, "write_parquet"),
    ):
        with monkeypatch.context() as m:
            m.setattr(cls, method, half_written)
            res = _run("map", q, "--store", store, "--atlas", "tiny", "--out", out.with_suffix(suffix))  # fmt: skip
        _interrupted(res)
        assert sorted(p.name for p in out.parent.glob(".*")) == []
    assert not out.with_suffix(".parquet").exists()
    assert out.read_bytes() == before  # the earlier output, whole


def test_a_failed_save_leaves_no_output_file(mapped, monkeypatch):
    """--out and --table are renamed into place only after --save-as has written."""
    from cellvec.cell_index.result import MappingResult

    store, q, out = mapped
    before, table = out.read_bytes(), out.with_suffix(".csv")

    def refused(self, store, name):
        raise PermissionError(13, "Permission denied", str(store))

    monkeypatch.setattr(MappingResult, "save", refused)
    args = ("--out", out, "--table", table, "--save-as", "run1")
    res = _run("map", q, "--store", store, "--atlas", "tiny", *args)
    _one_line_error(res, "Permission denied")
    assert out.read_bytes() == before and not table.exists()
    assert sorted(p.name for p in out.parent.glob(".*")) == []


def test_what_the_file_system_refuses_is_one_line(mapped, monkeypatch):
    from cellvec.cell_index.result import MappingResult

    store, q, out = mapped

    def refused(self, path, suffix):  # the file system refuses the output's folder
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(MappingResult, "write_as", refused)
    res = _run("map", q, "--store", store, "--atlas", "tiny", "--out", out)
    _one_line_error(res, str(out), "Permission denied", "give a path you can write")


def test_a_report_is_replaced_whole_or_not_at_all(mapped, tmp_path, monkeypatch):
    import cellvec.report.plots as plots

    store, _, out = mapped
    rep = tmp_path / "rep"
    res = _run("report", out, "--store", store, "--truth-key", "cell_type", "--out", rep)
    assert res.exit_code == 0, res.output
    assert (rep / "confusion.png").exists()
    page = (rep / "report.html").read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(plots, "plot_confidence", interrupted)
        _interrupted(_run("report", out, "--store", store, "--out", rep))
    assert (rep / "report.html").read_bytes() == page  # the previous report, whole
    assert not [p.name for p in rep.iterdir() if p.name.startswith(".")]
    res = _run("report", out, "--store", store, "--out", rep)  # no truth: no confusion
    assert res.exit_code == 0, res.output
    assert not (rep / "confusion.png").exists()  # not left from the first report


def test_a_report_of_a_file_that_is_not_h5ad_is_one_line(mapped, tmp_path):
    store, _, _ = mapped
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    _one_line_error(_run("report", junk, "--store", store, "--out", tmp_path / "r"), "junk.h5ad")


def test_an_export_that_fails_while_replacing_keeps_the_old_bundle(mapped, tmp_path, monkeypatch):  # fmt: skip
    store, _, _ = mapped
    out = tmp_path / "b.cellvec"
    assert _run("atlas", "export", "tiny", "--store", store, "--out", out).exit_code == 0
    card = (out / "card.json").read_text()
    rename = Path.rename

    def interrupted_swap(self, target):
        if Path(target) == out.resolve() and ".tmp" in self.name:
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_swap)
    res = _run("atlas", "export", "tiny", "--store", store, "--out", out, "--overwrite")
    _interrupted(res)  # at the swap
    assert (out / "card.json").read_text() == card
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".b.")) == []


def test_an_interrupted_first_build_leaves_no_view(fake_store, monkeypatch):
    """Stopped between the view's write and the atlas's: the view stayed, of no atlas."""
    import cellvec.cell_index.build as build

    write, calls = build._write, []

    def view_then_interrupted(store, name, *a, **k):
        calls.append(name)
        if len(calls) == 2:  # the atlas, after its view
            raise KeyboardInterrupt
        return write(store, name, *a, **k)

    monkeypatch.setattr(build, "_write", view_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_atlas(fake_store)
    assert calls == ["tiny__species", "tiny"]
    assert not [t for t in Store(fake_store).table_names() if t.startswith("atlas_tiny")]


def test_a_failing_sql_query_leaves_its_output_as_it_was(mapped, tmp_path):
    store, _, _ = mapped
    out = tmp_path / "rows.csv"
    out.write_text("kept\n")
    res = _run("sql", "SELECT * FROM no_such_table", "--store", store, "-o", out)
    _one_line_error(res, "no_such_table")
    assert out.read_text() == "kept\n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".rows")]


def test_sql_output_in_a_new_folder_or_under_a_file(mapped, tmp_path, monkeypatch):
    """-o makes its folder (a FileNotFoundError traceback before); a folder that cannot be
    made is named as given, before the query runs; rows that fail midway leave nothing."""
    import cellvec.sql

    store, q, _ = mapped
    new = tmp_path / "new" / "rows.csv"
    res = _run("sql", "SELECT symbol FROM genes", "--store", store, "-o", new)
    assert res.exit_code == 0, res.output
    assert new.read_text().startswith("symbol")
    _one_line_error(
        _run("sql", "SELECT 1", "--store", store, "-o", q / "rows.csv"), f"{q} is a file"
    )

    def half_then_fails(result, fmt, fh):
        fh.write("half")
        raise RuntimeError("stream broke")

    monkeypatch.setattr(cellvec.sql, "write_result", half_then_fails)
    res = _run("sql", "SELECT symbol FROM genes", "--store", store, "-o", new)
    assert isinstance(res.exception, RuntimeError)
    assert new.read_text().startswith("symbol") and sorted(
        p.name for p in new.parent.iterdir()
    ) == ["rows.csv"]


@pytest.mark.parametrize("name, data", [("empty.pkl", b""), ("cut.pickle", pickle.dumps({"A": [1.0] * 50})[:30]), ("junk.parquet", b"PAR1 not parquet")])  # fmt: skip
def test_unreadable_gene_vectors_are_named(tmp_path, name, data):
    from cellvec.gene_store.sources import read_vectors

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputFormatError, match=f"{name}: cannot read vectors.*; give a pickle"):
        read_vectors(path)


@pytest.mark.parametrize("name, data", [("empty.csv", ""), ("junk.parquet", "PAR1 no")])
def test_unreadable_summaries_are_named(tmp_path, name, data):
    from cellvec.gene_store.sources import read_summaries

    path = tmp_path / name
    path.write_text(data)
    with pytest.raises(
        InputFormatError, match=f"{name}: not a readable.*symbol and a summary column"
    ):
        read_summaries(path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_a_label_map_that_is_not_an_object_is_named(tmp_path, text):
    from cellvec.cell_index.mapping import read_label_map

    path = tmp_path / "labels.json"
    path.write_text(text)
    with pytest.raises(InputFormatError, match="labels.json: .*a label map is a JSON object"):
        read_label_map(path)
    path.write_text(json.dumps({"T": "T cell"}))
    assert read_label_map(path) == {"T": "T cell"}


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    from cellvec._files import replacing

    path = tmp_path / "out.csv"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt), replacing(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    with replacing(path) as tmp:
        tmp.write_text("new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_build_stopped_after_its_atlas_is_written_keeps_the_pair(fake_store, monkeypatch):
    """Stopped after the atlas's commit (e.g. while its disk index builds): the view it
    names stays, or the atlas would name a view that is gone."""
    import cellvec.cell_index.build as build

    write = build._write

    def written_then_interrupted(store, name, *a, **k):
        out = write(store, name, *a, **k)
        if name == "tiny":
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(build, "_write", written_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_atlas(fake_store)
    names = Store(fake_store).table_names()
    assert "atlas_tiny" in names and "atlas_tiny__species" in names


def test_a_number_of_neighbours_or_a_split_out_of_range_is_refused_before_any_work(mapped):
    """`atlas build -k`, `map -k`, `evaluate -k` and `map_cells(k=)` share the bound a
    bundle's k is held to (1 to `MAX_K`; build stored -k 0 as 15 and -k -3 as -3); a
    calibration split of 1 or more was a numpy traceback."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.mapping import map_cells
    from cellvec.cell_index.recipe import MAX_K
    from cellvec.errors import CellvecError

    store, q, _ = mapped
    build = ("atlas", "build", q, "--store", store, "--name", "other", "--label-key", "cell_type")
    for k in (0, MAX_K + 1):
        for args in (build, ("map", q, "--store", store, "--atlas", "tiny"), ("evaluate", q, "--store", store, "--label-key", "cell_type")):  # fmt: skip
            _one_line_error(_run(*args, "-k", k), f"{k} is not in the range 1<=x<={MAX_K}")
        with pytest.raises(CellvecError, match=f"k {k}: give a number of neighbours from 1 to {MAX_K}"):  # fmt: skip
            build_atlas(q, store=store, name="other", label_key="cell_type", options=BuildOptions(k=k))  # fmt: skip
        with pytest.raises(CellvecError, match=f"k must be from 1 to {MAX_K}, got {k}"):
            map_cells(q, "tiny", store=store, k=k)
    for split in (1.5, -0.1):
        res = _run(*build, "--calibration-split", split)
        _one_line_error(res, f"Calibration split {split:g}", "0.1 is a good start")
    assert "atlas_other" not in Store(store).table_names()


def test_an_evaluation_s_markdown_is_checked_before_any_fitting(mapped, tmp_path, monkeypatch):
    import cellvec.evaluation.evaluate as ev

    store, q, _ = mapped
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("fitted before the check"))
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    res = _run("evaluate", q, "--store", store, "--label-key", "cell_type", "--markdown", blocked / "r.md")  # fmt: skip
    _one_line_error(res, "is a file, so no folder can be made there")


def test_a_store_this_user_may_not_write_is_named_with_the_fix(fake_store, monkeypatch):
    """Lance's own words for a folder the user cannot write (root writes anywhere, so the
    refusal is raised where Lance would raise it)."""
    from cellvec.errors import StoreError
    from cellvec.storage import replace_table

    db = Store(fake_store).db

    def refused(*a, **k):
        raise RuntimeError("LanceError(IO): Unable to create dir: Permission denied (os error 13)")

    monkeypatch.setattr(db, "create_table", refused)
    with pytest.raises(StoreError, match="permission denied.*Fix: write into a store folder of yours"):  # fmt: skip
        replace_table(db, "mapping_x", {"a": [1]})
