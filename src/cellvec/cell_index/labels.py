"""The reference's labels: which obs column holds them, which cells carry one, which are
excluded, and the broad level above them (`--broad-label-key`).

An atlas is built from the cells `reference_labels` keeps; mapping and evaluation read
a query's known labels with `labels_of`.
"""

from __future__ import annotations

import logging

import numpy as np

from cellvec.cell_index.readers import ExpressionSource
from cellvec.errors import CellvecError, InputFormatError

log = logging.getLogger(__name__)


def label_column(source: ExpressionSource, label_key: str, option: str = "--label-key"):
    """The obs column `label_key`, or an error naming the columns there are and `option`,
    the command-line option that named it."""
    if label_key not in source.obs.columns:
        raise InputFormatError(
            f"{source.path}: no cell annotation {label_key!r}; obs columns are: "
            f"{', '.join(map(str, source.obs.columns)) or 'none'}. Name one with {option}."
        )
    return source.obs[label_key]


def labels_of(
    source: ExpressionSource,
    label_key: str,
    *,
    label_map: dict[str, str] | None = None,
    option: str = "--label-key",
) -> np.ndarray:
    """The cells' labels as strings, renamed through `label_map` (cross-study names) if given;
    `option` is the command-line option named in the error for a missing column."""
    labels = label_column(source, label_key, option).astype(str)
    if label_map:
        labels = labels.replace(label_map)
    return labels.to_numpy(dtype=object)


def broad_labels_of(source: ExpressionSource, labels: np.ndarray, key: str) -> np.ndarray:
    """The cells' broad labels; a cell without one takes its fine label. Logs a fine label
    that falls under several broad ones (its cells then get the broad vote's label)."""
    broad = label_column(source, key, "--broad-label-key").astype(str).to_numpy(dtype=object)
    missing = ~known_labels(source, key, "--broad-label-key")
    broad[missing] = labels[missing]
    if missing.any():
        log.warning(
            "%s: %d cells without a %s label are their own broad class",
            source.path,
            int(missing.sum()),
            key,
        )
    fine_classes, fine = np.unique(labels.astype(str), return_inverse=True)
    broad_classes, codes = np.unique(broad.astype(str), return_inverse=True)
    for c in np.flatnonzero(class_parents(fine, len(fine_classes), codes, len(broad_classes)) < 0):
        found = broad_classes[np.unique(codes[fine == c])]
        log.warning(
            "Label %r falls under several %s: %s", str(fine_classes[c]), key, ", ".join(found[:5])
        )
    return broad


def pair_counts(fine: np.ndarray, n_fine: int, broad: np.ndarray, n_broad: int) -> np.ndarray:
    """Cells per (fine class, broad class), from each cell's fine and broad class index."""
    flat = fine.astype(np.int64) * n_broad + broad
    return np.bincount(flat, minlength=n_fine * n_broad).reshape(n_fine, n_broad)


def class_parents(fine: np.ndarray, n_fine: int, broad: np.ndarray, n_broad: int) -> np.ndarray:
    """Each fine class's broad class index (from each cell's fine and broad class index),
    -1 where its cells carry several broad classes (or none)."""
    found = pair_counts(fine, n_fine, broad, n_broad) > 0
    return np.where(found.sum(1) == 1, found.argmax(1), -1)


def known_labels(
    source: ExpressionSource, label_key: str, option: str = "--label-key"
) -> np.ndarray:
    """True for cells that carry a (non-empty) label."""
    col = label_column(source, label_key, option)
    return (col.notna() & (col.astype(str).str.len() > 0)).to_numpy()


def parse_labels(labels) -> list[str]:
    """Labels given as "A,B" or a list, stripped, empty ones dropped, order kept."""
    if labels is None:
        return []
    items = labels.split(",") if isinstance(labels, str) else labels
    return list(dict.fromkeys(str(x).strip() for x in items if str(x).strip()))


def reference_labels(
    source: ExpressionSource,
    label_key: str,
    *,
    broad_label_key: str | None = None,
    exclude_labels=(),
) -> tuple[ExpressionSource, np.ndarray, np.ndarray | None, dict[str, int]]:
    """The cells an atlas is built from, with their labels: cells without a label are left
    out (a logged count), then those carrying one of `exclude_labels` (fine or broad).

    Returns (the kept cells, their labels, their broad labels or None, {excluded label:
    cells}). A reference left with fewer than two classes is refused: an atlas of one class
    would call every query cell that class."""
    known = known_labels(source, label_key)
    if not known.any():
        raise InputFormatError(
            f"{source.path}: none of its {source.n_obs:,} cells has a {label_key!r} label (the "
            "column is empty or all missing); name the obs column that holds the cell types "
            f"with --label-key (obs columns: {', '.join(map(str, source.obs.columns))})."
        )
    if not known.all():
        log.warning(
            "%s: %d cells without a %s label excluded", source.path, int((~known).sum()), label_key
        )
        source = source.subset(known)
    labels = labels_of(source, label_key)
    broad = broad_labels_of(source, labels, broad_label_key) if broad_label_key else None
    excluded, drop = {}, np.zeros(len(labels), dtype=bool)
    for x in parse_labels(exclude_labels):
        hit = (labels == x) | ((broad == x) if broad is not None else False)
        excluded[x] = int(hit.sum())
        drop |= hit
    if excluded:
        if drop.all():
            raise CellvecError(
                f"--exclude-labels {','.join(excluded)} drops every cell of {source.path}."
            )
        log.info(
            "Excluded from the reference: %s",
            ", ".join(f"{x} ({n:,} cells)" for x, n in excluded.items()),
        )
        source = source.subset(~drop)
        labels = labels[~drop]
        broad = broad[~drop] if broad is not None else None
    classes = np.unique(labels)
    if len(classes) < 2:
        after = f" after --exclude-labels {','.join(excluded)}" if excluded else ""
        raise InputFormatError(
            f"{source.path}: all {len(labels):,} labelled cells{after} are {str(classes[0])!r} "
            f"in {label_key!r}, and an atlas of one class would call every query cell "
            f"{str(classes[0])!r}; it needs at least two. Name an obs column with several cell "
            "types with --label-key, "
            + (
                "add reference cells of other types, or exclude fewer labels."
                if excluded
                else "or add reference cells of other types."
            )
        )
    return source, labels, broad, excluded
