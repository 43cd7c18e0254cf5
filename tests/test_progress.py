"""Progress when stderr is not a terminal: log lines (count, rate, time left), no bar."""

from __future__ import annotations

import io
import sys

import pytest

from cellvec import _progress
from cellvec._progress import progress
from helpers import FakeEmbedder, build_tiny


@pytest.fixture
def batch_job(monkeypatch):
    """stderr is a file, as under nohup or a scheduler."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.delenv("CELLVEC_PROGRESS", raising=False)
    return stream


def test_no_tty_logs_count_rate_and_time_left(batch_job, monkeypatch, caplog):
    monkeypatch.setattr(_progress, "LOG_INTERVAL", 0.0)
    with (
        caplog.at_level("INFO", logger="cellvec._progress"),
        progress(total=400, desc="embedding (fake)", unit="gene") as bar,
    ):
        bar.update(100)
        bar.set_postfix(loss="0.5")
        bar.update(100)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("embedding (fake): 100 of 400 genes (25%), ")
    assert "genes/s" in lines[0] and lines[0].endswith(" left")
    assert lines[1].startswith("embedding (fake): 200 of 400 genes (50%)")
    assert lines[1].endswith("(loss=0.5)")
    assert batch_job.getvalue() == ""  # no bar drawn into the log file


def test_lines_come_at_most_every_interval(batch_job, caplog):
    assert _progress.LOG_INTERVAL >= 10  # a default that does not flood a log file
    with caplog.at_level("INFO", logger="cellvec._progress"):
        for _ in progress(range(1000), desc="fast"):
            pass
    assert caplog.records == []


def test_gene_store_build_reports_progress_in_a_batch_job(
    batch_job, monkeypatch, caplog, tmp_path, gene_files
):
    monkeypatch.setattr(_progress, "LOG_INTERVAL", 0.0)
    with caplog.at_level("INFO"):
        build_tiny(gene_files, tmp_path / "store", embedder=FakeEmbedder(), batch_size=8)
    lines = [r.getMessage() for r in caplog.records if r.name == "cellvec._progress"]
    assert lines and lines[-1].startswith("embedding (fake): 30 of 30 genes (100%)"), lines
