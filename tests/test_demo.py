"""`cellvec demo` end to end, its report in a real headless browser, and the README's SQL."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from cellvec.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out)


def test_demo_summary_and_outputs(demo):
    out, summary = demo
    for key in (
        "accuracy",
        "macro_f1",
        "balanced_accuracy",
        "unassigned_fraction",
        "seconds",
        "report",
    ):
        assert key in summary
    assert summary["accuracy"] >= 0.7 and summary["n_cells"] == 210
    assert summary["seconds"] < 300
    for f in (
        "report/report.html",
        "report/umap.png",
        "report/confusion.png",
        "report/per_class_f1.png",
        "report/confidence.png",
        "report/reliability.png",
        "mapped.h5ad",
        "mapped.parquet",
        "summary.json",
    ):
        assert (out / f).stat().st_size > 0, f


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_report_renders_with_every_image(demo, tmp_path):
    out, summary = demo
    html = Path(summary["report"])
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    dom = subprocess.run(
        cmd + ["--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert 'data-images-loaded="5/5"' in dom  # UMAP, confusion, F1, confidence, reliability
    shot = tmp_path / "report.png"
    subprocess.run(
        cmd + ["--window-size=1400,2400", f"--screenshot={shot}", html.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.stat().st_size > 50_000


def test_readme_sql_examples_run_on_the_demo_store(demo):
    from cellvec.sql import connect_sql

    out, summary = demo
    text = (ROOT / "README.md").read_text()
    block = text[text.index("```sql") + 6 : text.index("```", text.index("```sql") + 6)]
    queries = [
        q.strip().rstrip(";") for q in re.split(r"\n-- \d+\.[^\n]*\n", "\n" + block) if q.strip()
    ]
    assert len(queries) == 10
    conn = connect_sql(summary["store"])
    for q in queries:
        assert conn.query(q).height > 0, q
