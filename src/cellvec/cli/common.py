"""Helpers shared by CLI commands."""

from __future__ import annotations

import click
import numpy as np


def subset_source(path, subset: str | None, **read_options):
    """Open an expression file, keeping cells where `COLUMN=V1,V2` holds (if given)."""
    from cellvec.cell_index.readers import read_expression

    src = read_expression(path, **read_options)
    if not subset:
        return src
    column, _, values = subset.partition("=")
    if not values or column not in src.obs.columns:
        raise click.BadParameter(
            f"{subset!r}: use COLUMN=V1,V2 with an obs column ({', '.join(map(str, src.obs.columns))}).",
            param_hint="--subset",
        )
    keep = src.obs[column].astype(str).isin(values.split(",")).to_numpy()
    if not keep.any():
        found = ", ".join(map(str, src.obs[column].astype(str).unique()[:10]))
        raise click.BadParameter(
            f"no cell has {column} in {values} (values: {found}).", param_hint="--subset"
        )
    return src.subset(np.asarray(keep))
