"""What `evaluate` scores, as objects built once at the edge (the CLI, a benchmark).

`EvaluationPlan` is the cross-validation (folds, k, seed, which representations),
`Scenarios` the runs beyond plain folds (data-limited curve, panels, left-out
subtypes, a species swap, transfer to a second dataset). How cells become vectors
is a `cellvec.cell_index.recipe.Recipe`; what to read, an `ExpressionSource`.

The representation names live here too, so a plan is checked when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cellvec.errors import CellvecError
from cellvec.evaluation.baselines import EXPRESSION_BASELINES

# vector representation -> (its changes to the recipe, its gene vectors)
VECTOR_REPRESENTATIONS = {
    "cellvec": ({}, "model"),
    "cellvec_unrefined": ({"refine": "none", "adapt_genes": False}, "model"),
    "naive_mean": (
        {"refine": "none", "adapt_genes": False, "background": "none", "center": False},
        "model",
    ),
    "random_vectors": ({}, "random"),
    "graph_baseline": ({}, "go_graph"),
    "head_only": ({"adapt_genes": False}, "model"),
    "no_center": ({"center": False}, "model"),
    "top200": ({"top_genes": 200}, "model"),
}
BASELINES = (
    "pca_knn",
    "logreg_expr",
    "logreg_balanced",
    "naive_mean",
    "graph_baseline",
    "random_vectors",
    "cellvec_unrefined",
)
ABLATIONS = ("head_only", "no_center", "top200")
PEERS = ("celltypist",)
UNREFINED = (
    "cellvec_unrefined",
    "head_only",
)  # the same as cellvec when the recipe has no refinement


@dataclass(frozen=True)
class EvaluationPlan:
    """The cross-validation: `folds` stratified folds shuffled with `seed`, `k` neighbours
    in cellvec's vote.

    `representations` names exactly which to score in folds and transfer (default:
    cellvec, plus `BASELINES` with `baselines`, the real `peers` (celltypist) and
    `ABLATIONS` with `ablations`); an empty tuple runs only the scenarios.
    `skip_folds` scores only the transfer. `refine_options` go to the refinement
    (`fit_refinement`), e.g. fewer steps in tests. `prior`: the name of a pre-trained prior
    in the store (`cellvec prior build`) that cellvec's atlases start from (the random and
    GO-graph controls never do).
    """

    folds: int = 5
    k: int = 15
    seed: int = 0
    representations: tuple[str, ...] | None = None
    baselines: bool = False
    peers: tuple[str, ...] = ()
    ablations: bool = False
    skip_folds: bool = False
    refine_options: dict | None = None
    prior: str | None = None

    def __post_init__(self):
        if self.folds < 2 and not self.skip_folds:
            raise CellvecError(
                f"folds must be 2 or more, got {self.folds} (skip_folds=True scores only a "
                "query's transfer)."
            )
        if self.refine_options is not None:
            from cellvec.cell_index.refine import RefineOptions

            RefineOptions.from_dict(self.refine_options)  # names and values, before any fold
        object.__setattr__(self, "peers", tuple(self.peers))
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise CellvecError(f"Unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}.")
        if self.representations is not None:
            object.__setattr__(self, "representations", tuple(self.representations))
            known = set(VECTOR_REPRESENTATIONS) | set(EXPRESSION_BASELINES) | set(PEERS)
            bad = [
                r for r in self.representations if r not in known and not r.startswith("cellvec:")
            ]
            if bad:
                raise CellvecError(
                    f"Unknown representation {bad[0]!r}; choose from {', '.join(sorted(known))}."
                )

    def names(self, models: list[str], refine: str) -> list[str]:
        """The representations scored, in order: a `cellvec:MODEL` for each model after the
        first; without refinement (`refine` "none") none of `UNREFINED`."""
        names = (
            (list(BASELINES) if self.baselines else [])
            + list(self.peers)
            + (list(ABLATIONS) if self.ablations else [])
            + ["cellvec"]
            + [f"cellvec:{m}" for m in models[1:]]
        )
        if self.representations is not None:
            names = list(self.representations)
        if refine == "none":
            names = [x for x in names if x not in UNREFINED]
        return names


@dataclass(frozen=True)
class UnassignedCall:
    """`map_cells`' thresholds for the unassigned call, scored with left-out subtypes and
    at two levels: typicality, the mixing test's p-value and the vote's confidence."""

    min_typicality: float = 0.01
    min_mixing: float = 0.01
    min_confidence: float = 0.0


@dataclass(frozen=True)
class Transfer:
    """A second labelled dataset (an `ExpressionSource`, or a path or AnnData read as is),
    mapped onto the whole evaluated dataset without retraining. `label_key`: its label
    column (default: the evaluated dataset's); `label_map`: its labels renamed to the
    reference's."""

    query: object
    label_key: str | None = None
    label_map: dict[str, str] | None = None


@dataclass(frozen=True)
class Scenarios:
    """Runs beyond plain folds, each in the plan's folds.

    `data_limited`: reference cells per class for a learning curve. `panels`: shares of
    the genes kept in the query. `leave_out`: subtypes left out of the reference, scored
    with the unassigned call `call`. `species_swap` ("mouse" or "human", with an
    `orthologs` table or its file, such as HCOP's): each fold's query (and the transfer
    query) renamed to that species' symbols. `transfer`: a second labelled dataset.
    """

    data_limited: tuple[int, ...] = ()
    panels: tuple[float, ...] = ()
    leave_out: tuple[str, ...] = ()
    call: UnassignedCall = field(default_factory=UnassignedCall)
    species_swap: str | None = None
    orthologs: str | Path | object | None = None
    transfer: Transfer | None = None

    def __post_init__(self):
        for name in ("data_limited", "panels", "leave_out"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
