"""A self-contained HTML report (images inlined) plus the same plots as PNG files."""

from __future__ import annotations

import base64
import html
import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np

import cellvec.report.plots as plots
from cellvec.cell_index.bundle import card_rows

log = logging.getLogger(__name__)


# the PNGs a report may draw beside report.html (`_draw` makes those it needs)
PNGS = ("umap", "confidence", "confusion", "per_class_f1", "reliability")


def write_report(out_dir: str | Path, **parts) -> Path:
    """Write `report.html` and PNGs into `out_dir` (`_draw` says what `parts` are);
    returns the HTML path. They are made in a folder of their own inside `out_dir` (the
    same file system) and moved in, report.html last (it holds the figures itself): an
    interrupted report leaves the previous one whole, and no PNG of an earlier report
    that this one does not draw stays beside it."""
    final = Path(out_dir)
    final.mkdir(parents=True, exist_ok=True)
    work = final / f".report.{uuid.uuid4().hex[:12]}.tmp"
    work.mkdir()
    try:
        page = _draw(work, **parts)
        drawn = {p.name for p in work.glob("*.png")}
        if (final / "report.html").exists():  # an earlier report's folder: its figures go
            for name in PNGS:
                if f"{name}.png" not in drawn:
                    (final / f"{name}.png").unlink(missing_ok=True)
        for name in sorted(drawn):
            (work / name).replace(final / name)
        page.replace(final / page.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final / "report.html"


def _draw(
    out: Path,
    *,
    ref_vectors: np.ndarray,
    ref_labels,
    query_vectors: np.ndarray,
    query_labels,
    confidence: np.ndarray,
    recipe: dict,
    metrics: dict | None = None,
    summary: dict | None = None,
    min_confidence: float = 0.0,
    truth=None,
    typicality=None,
    mixing=None,
    title: str = "cellvec mapping report",
    max_points: int = 20_000,
    seed: int = 0,
    card: dict | None = None,
) -> Path:
    """Write `report.html` and PNGs into `out`; returns the HTML path.

    With `truth` (known labels of the query cells) the report also shows the
    reliability of the confidence and the calibration of `typicality` (and of `mixing`,
    the mixing test's p-values, when the mapping ran it). With `card` (the atlas's card,
    `cell_index.bundle.atlas_card`) it also shows what the atlas is."""
    rng = np.random.default_rng(seed)
    ri = np.sort(rng.permutation(len(ref_vectors))[:max_points])
    qi = np.sort(rng.permutation(len(query_vectors))[:max_points])
    both = np.vstack([ref_vectors[ri], query_vectors[qi]])
    log.info("UMAP of %s reference + %s query cells", f"{len(ri):,}", f"{len(qi):,}")
    xy = plots.umap_embedding(both, seed=seed)
    pngs = {}
    pngs["umap"] = out / "umap.png"
    plots.plot_umap(
        xy[: len(ri)],
        np.asarray(ref_labels)[ri],
        xy[len(ri) :],
        np.asarray(query_labels)[qi],
        np.asarray(confidence)[qi],
        pngs["umap"],
    )
    pngs["confidence"] = out / "confidence.png"
    plots.plot_confidence(np.asarray(confidence), min_confidence, pngs["confidence"])
    if metrics:
        pngs["confusion"] = out / "confusion.png"
        plots.plot_confusion(metrics, pngs["confusion"])
        pngs["per_class_f1"] = out / "per_class_f1.png"
        plots.plot_per_class_f1(metrics, pngs["per_class_f1"])
    if truth is not None:
        pngs["reliability"] = out / "reliability.png"
        correct = np.asarray(truth).astype(str) == np.asarray(query_labels).astype(str)
        plots.plot_reliability(
            np.asarray(confidence, dtype=float),
            correct,
            typicality,
            pngs["reliability"],
            mixing=mixing,
        )
    path = out / "report.html"
    path.write_text(_html(title, pngs, recipe, metrics, summary or {}, card))
    return path


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _card_html(card: dict | None) -> str:
    """The atlas card (`bundle.card_rows`): what it is, its classes with counts and, when
    scored, their F1."""
    if not card:
        return ""
    fields, classes = card_rows(card)
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in [("atlas", card["atlas"]), *fields]
    )
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (c, f"{n:,}", f1, cl)) + "</tr>"
        for c, n, f1, cl in classes
    )
    return (
        f"<h2>Atlas</h2><table class='card'>{rows}</table>"
        f"<table class='grid'><tr><th>class</th><th>cells</th><th>F1 (cross-validated)</th>"
        f"<th>Cell Ontology</th></tr>{cells}</table>"
    )


def _html(title, pngs, recipe, metrics, summary, card=None) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in recipe.items()
    )
    headline = ""
    if metrics:
        headline = (
            f"<div class='kpis'><div><b>{metrics['accuracy']:.3f}</b>accuracy</div>"
            f"<div><b>{metrics['macro_f1']:.3f}</b>macro-F1</div>"
            f"<div><b>{metrics['balanced_accuracy']:.3f}</b>balanced accuracy</div>"
            f"<div><b>{metrics['unassigned_fraction']:.1%}</b>unassigned</div>"
            f"<div><b>{metrics['n_cells']:,}</b>cells</div></div>"
        )
        per = "".join(
            f"<tr><td>{html.escape(c)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
            f"<td>{m['f1']:.3f}</td><td>{m['support']:,}</td></tr>"
            for c, m in metrics["per_class"].items()
        )
        per_table = (
            "<h2>Per class</h2><table class='grid'><tr><th>class</th><th>precision</th><th>recall</th>"
            f"<th>F1</th><th>support</th></tr>{per}</table>"
        )
    else:
        per_table = ""
    extra = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}</td></tr>"
        for k, v in summary.items()
    )
    figs = []
    captions = {
        "umap": "UMAP of reference and query cell vectors, coloured by label and by confidence",
        "confusion": "Confusion matrix (rows: true label; numbers: cells)",
        "per_class_f1": "Per-class F1 with support",
        "confidence": "Confidence histogram",
        "reliability": "Reliability: observed accuracy against confidence, and the typicality "
        "(and mixing) calibration behind the unassigned call",
    }
    for key in ("umap", "confusion", "per_class_f1", "confidence", "reliability"):
        if key in pngs:
            figs.append(_img(pngs[key], captions[key]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1500px; color: #222; padding: 0 1em; }}
h1 {{ font-size: 1.6em; }} h2 {{ margin-top: 1.6em; border-bottom: 1px solid #ddd; }}
.kpis {{ display: flex; gap: 2em; margin: 1em 0; flex-wrap: wrap; }}
.kpis div {{ background: #f3f6fa; padding: .8em 1.2em; border-radius: 8px; min-width: 8em; }}
.kpis b {{ display: block; font-size: 1.8em; }}
figure {{ margin: 1.5em 0; }} figure img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: .9em; }}
table {{ border-collapse: collapse; }} th, td {{ text-align: left; padding: .25em .8em; border-bottom: 1px solid #eee; }}
table.grid td {{ font-variant-numeric: tabular-nums; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{headline}
<h2>Plots</h2>
{"".join(figs)}
{per_table}
<h2>Run</h2><table>{extra}</table>
{_card_html(card)}
<h2>Recipe</h2><table>{rows}</table>
<script>
// Lets a headless browser (and the test suite) confirm every plot decoded.
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""
