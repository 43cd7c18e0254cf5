"""`cellvec report`: an HTML report of a mapping."""

from __future__ import annotations

from pathlib import Path

import click

from cellvec.cli.options import STORE_HELP, store_options


@click.command("report")
@click.argument("mapped", type=click.Path(exists=True, dir_okay=False))
@store_options(required=False, help=STORE_HELP + " Not needed with --atlas BUNDLE.")
@click.option(
    "--atlas",
    "atlas_name",
    help="Atlas the cells were mapped onto (default: the one recorded in MAPPED), or the "
    "bundle it came from (a folder or URL; no --store then).",
)
@click.option(
    "--truth-key", help="obs column with known labels (adds confusion matrix and per-class F1)."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for report.html and PNGs.",
)
def report_cmd(mapped, store, atlas_name, truth_key, out):
    """Write an HTML report (UMAP, confusion, per-class F1, confidence and its reliability,
    recipe) for a mapped .h5ad.

    \b
    Example:
      cellvec report mapped.h5ad --store store/ --truth-key cell_type --out report/
    """
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.bundle import atlas_card
    from cellvec.cell_index.readers import open_h5ad
    from cellvec.errors import CellvecError
    from cellvec.fetch import resolve_atlas
    from cellvec.metrics import classification_metrics
    from cellvec.report import write_report

    a = open_h5ad(Path(mapped))
    for key in ("cellvec_label", "cellvec_confidence"):
        if key not in a.obs.columns:
            raise CellvecError(
                f"{mapped}: no obs['{key}']; write it with `cellvec map ... --out {Path(mapped).name}`."
            )
    if store is None and not atlas_name:
        raise click.UsageError("Give --store DIR, or --atlas BUNDLE (a folder or URL).")
    if atlas_name:
        store, atlas_name = resolve_atlas(store, atlas_name)
    name = atlas_name or a.uns.get("cellvec", {}).get("atlas")
    if not name:
        raise CellvecError(f"{mapped}: the atlas is not recorded; give --atlas.")
    atlas = Atlas.open(store, name)
    metrics = None
    if truth_key:
        if truth_key not in a.obs.columns:
            raise CellvecError(f"{mapped}: no obs column {truth_key!r}.")
        metrics = classification_metrics(
            a.obs[truth_key].astype(str), a.obs["cellvec_label"].astype(str)
        )
    path = write_report(
        out,
        ref_vectors=atlas.vectors,
        ref_labels=atlas.labels.astype(str),
        query_vectors=a.obsm["X_cellvec"],
        query_labels=a.obs["cellvec_label"].astype(str).to_numpy(),
        confidence=a.obs["cellvec_confidence"].to_numpy(),
        recipe=atlas.recipe.to_dict(),
        metrics=metrics,
        truth=a.obs[truth_key].astype(str).to_numpy() if truth_key else None,
        typicality=a.obs["cellvec_typicality"].to_numpy()
        if "cellvec_typicality" in a.obs.columns
        else None,
        mixing=a.obs["cellvec_mixing"].to_numpy() if "cellvec_mixing" in a.obs.columns else None,
        summary={"mapped": mapped, "atlas": name, "cells": a.n_obs},
        min_confidence=float(a.uns.get("cellvec", {}).get("min_confidence", 0.0)),
        card=atlas_card(store, name),
    )
    click.echo(str(path))
