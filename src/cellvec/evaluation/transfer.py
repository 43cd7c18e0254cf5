"""Scores across datasets and species: transfer to a second labelled dataset (no
retraining), and the species swap (the query renamed to another species' symbols).

In the species swap, each fold's query (and the transfer query) is renamed through
the table's one-to-one orthologs (other genes dropped, as a real cross-species
query lacks them) and mapped onto the unchanged reference: cellvec through
`orthologs=`, the expression peers (logistic regression zero-filled and retrained
on the kept genes, CellTypist) on the kept genes under their own names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from cellvec.cell_index.labels import labels_of
from cellvec.cell_index.readers import ExpressionSource, read_expression
from cellvec.errors import CellvecError
from cellvec.evaluation.baselines import EXPRESSION_BASELINES
from cellvec.evaluation.cross_validation import CrossValidation
from cellvec.evaluation.plan import PEERS, Scenarios, Transfer
from cellvec.gene_store.orthologs import OrthologTable, read_orthologs
from cellvec.metrics import classification_metrics

log = logging.getLogger(__name__)


def translate(source: ExpressionSource, mapping: dict[str, str]):
    """(`source` with its genes renamed through `mapping` (upper-cased symbol -> symbol;
    genes without one dropped, a repeated name kept once), the same kept genes under their
    own names)."""
    import pandas as pd

    names = pd.Series(source.var_names, dtype=str).str.upper().map(mapping)
    keep = (names.notna() & ~names.duplicated()).to_numpy()
    if not keep.any():
        raise CellvecError(
            f"{source.path}: none of its {len(keep):,} genes has a one-to-one ortholog in the "
            "table: --species-swap names the other species, and --orthologs a table of both."
        )
    kept = source.subset_genes(keep)
    return replace(kept, var_names=names[keep].tolist()), kept


@dataclass(frozen=True)
class SpeciesSwap:
    """The query renamed to species `to` through `table`'s one-to-one orthologs
    (`mapping`: upper-cased symbol -> symbol)."""

    to: str
    table: OrthologTable
    mapping: dict[str, str]

    @classmethod
    def of(cls, scenarios: Scenarios) -> SpeciesSwap | None:
        """The scenarios' swap with its table read (or refused), None without one."""
        if not scenarios.species_swap:
            return None
        orthologs = scenarios.orthologs
        if orthologs is None:
            raise CellvecError(
                "--species-swap needs an ortholog table: --orthologs hcop_mouse_to_human.csv.gz "
                "(HCOP/Ensembl, either direction) or a two-column file."
            )
        if not isinstance(orthologs, OrthologTable):
            orthologs = read_orthologs(orthologs)
        return cls(scenarios.species_swap, orthologs, orthologs.one_to_one(scenarios.species_swap))


def species_swap_scores(cv: CrossValidation, swap: SpeciesSwap, peers: tuple[str, ...]):
    """((genes kept, genes), metrics per representation) with each fold's query renamed to
    `swap.to` symbols: cellvec maps it through the table, the expression peers see the
    kept genes."""
    source = cv.source
    kept = len(translate(source, swap.mapping)[1].var_names)
    log.info(
        "Species swap: %d of %d genes have a one-to-one %s ortholog",
        kept,
        len(source.var_names),
        swap.to,
    )
    scores = {}
    for name in ["logreg_expr", "logreg_panel", *peers, "cellvec"]:
        translated = name == "cellvec"
        scores[name] = cv.score(
            name,
            query_of=lambda i, q, t=translated: translate(q, swap.mapping)[0 if t else 1],
            orthologs=swap.table if translated else None,
        )
        log.info("query as %s %-12s macro-F1 %.3f", swap.to, name, scores[name]["macro_f1"])
    return (kept, len(source.var_names)), scores


def read_transfer(transfer: Transfer, label_key: str) -> tuple[ExpressionSource, np.ndarray]:
    """The transfer query and its labels (renamed through its label map)."""
    q = read_expression(transfer.query)
    return q, labels_of(q, transfer.label_key or label_key, label_map=transfer.label_map)


def transfer_scores(
    cv: CrossValidation, names: list[str], q: ExpressionSource, qy: np.ndarray
) -> dict[str, dict]:
    """Metrics per representation of the query `q` (labels `qy`) mapped onto the whole
    dataset."""
    out = {}
    for name in names:
        # another study: expression peers are trained on the genes both share, as a
        # careful user would (zero-filling the rest sank PCA + kNN to 0.28 on 68k -> 3k)
        out[name] = classification_metrics(
            qy, cv.predictors.predict(name, cv.source, cv.y, q, shared_genes=True)
        )
        log.info(
            "transfer %-18s accuracy %.3f  macro-F1 %.3f",
            name,
            out[name]["accuracy"],
            out[name]["macro_f1"],
        )
    return out


def swapped_transfer_scores(
    cv: CrossValidation, names: list[str], q: ExpressionSource, qy: np.ndarray, swap: SpeciesSwap
):
    """((genes kept, genes), metrics per representation) of the query renamed to
    `swap.to` symbols: vector representations map it through the table, the expression
    peers get the kept genes."""
    q_as, q_kept = translate(q, swap.mapping)
    out = {}
    for name in names:
        translated = name not in EXPRESSION_BASELINES and name not in PEERS
        out[name] = classification_metrics(
            qy,
            cv.predictors.predict(
                name,
                cv.source,
                cv.y,
                q_as if translated else q_kept,
                shared_genes=True,
                orthologs=swap.table if translated else None,
            ),
        )
        log.info("transfer as %s %-12s macro-F1 %.3f", swap.to, name, out[name]["macro_f1"])
    return (len(q_kept.var_names), len(q.var_names)), out
