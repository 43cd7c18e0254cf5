"""The calls every way of mapping shares: search past excluded cells, the vote, and the
unassigned calls (confidence, typicality, mixing), at the fine and the broad level.

`map_cells` (one process), the service's batches (`service.mapping`) and, through the
service, `Client.map` all call cells with these functions, so a label means the same
whichever way a cell was mapped. What they need of an atlas is small: its label codes
(`LabelCodes`), the reference cells a query is compared with (`Target`: the atlas
over its own genes, or re-aggregated over a query's panel) and, for the mixing test,
a sample of the reference before the head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import numpy as np
from scipy.special import log_softmax, ndtr, softmax

from cellvec.cell_index.calibration import Calibration
from cellvec.cell_index.knn import vote
from cellvec.cell_index.labels import parse_labels
from cellvec.cell_index.mixing import mixing_pvalues, unmixed
from cellvec.cell_index.recipe import MAX_K, is_count
from cellvec.cell_index.result import BroadCall
from cellvec.errors import CellvecError
from cellvec.gene_store.embedders.base import normalise_rows
from cellvec.gene_store.orthologs import OrthologTable, read_orthologs
from cellvec.metrics import UNASSIGNED, classification_metrics

log = logging.getLogger(__name__)

THRESHOLDS = ("min_confidence", "min_typicality", "min_mixing")


@dataclass(frozen=True)
class MapOptions:
    """How to call cells, built once at the edge (a Python call, the CLI, an HTTP request).

    `k`: neighbours in the vote (None: the atlas's own). A cell is unassigned below
    `min_confidence` (its vote's share), `min_typicality` (a conformal p-value against
    the reference's calibration cells) or `min_mixing` (the mixing test of the whole
    query, `cell_index.mixing`). `exclude_labels` are never given as answers.
    `orthologs` matches query genes of another species to the atlas's store genes."""

    k: int | None = None
    min_confidence: float = 0.0
    min_typicality: float = 0.0
    min_mixing: float = 0.0
    exclude_labels: tuple[str, ...] = ()
    orthologs: OrthologTable | None = None

    @classmethod
    def of(cls, **options) -> MapOptions:
        """Options from keywords as a caller writes them: `exclude_labels` as a list or a
        comma-separated string, `orthologs` as a table or its file; unknown names and
        values out of range are refused, naming the valid ones."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise CellvecError(
                f"Unknown mapping option(s) {', '.join(unknown)}; the options are "
                f"{', '.join(names)}."
            )
        orthologs = options.get("orthologs")
        if orthologs is not None and not isinstance(orthologs, OrthologTable):
            options["orthologs"] = read_orthologs(orthologs)
        options["exclude_labels"] = tuple(parse_labels(options.get("exclude_labels") or ()))
        out = cls(**options)
        if out.k is not None and not is_count(out.k, MAX_K):
            raise CellvecError(f"k must be from 1 to {MAX_K}, got {out.k}.")
        for name in THRESHOLDS:
            value = getattr(out, name)
            if not 0 <= value <= 1:
                raise CellvecError(f"{name} must be between 0 and 1, got {value}.")
        return out


@dataclass(frozen=True)
class LabelCodes:
    """The reference cells' labels as codes into sorted class names, at each level:
    `parent` gives each fine class's broad class (-1 where its cells carry several)."""

    classes: np.ndarray
    codes: np.ndarray
    broad_classes: np.ndarray | None = None
    broad_codes: np.ndarray | None = None
    parent: np.ndarray | None = None
    broad_key: str | None = None

    @property
    def has_broad(self) -> bool:
        return self.broad_classes is not None

    @property
    def n_cells(self) -> int:
        return len(self.codes)


@dataclass(frozen=True)
class Target:
    """The reference cells a query is compared with: the atlas over its own genes
    (`panel` None), or re-aggregated over the atlas genes a query measures. `calibration`
    (per reference cell, NaN outside the calibration cells; a `Calibration` for a query
    of another species) scores typicality; `broad_calibration` the broad level's.
    `prototypes` (the class centroids, for an atlas whose read-out is `centroid`)
    replace the neighbours' vote."""

    index: object
    calibration: np.ndarray | Calibration
    broad_calibration: np.ndarray | Calibration | None = None
    panel: np.ndarray | None = None
    prototypes: Prototypes | None = None  # the atlas's class centroids: its read-out


@dataclass
class Calls:
    """Per query cell: label, confidence, typicality, per-class scores, similarity to the
    nearest reference cell, vector, mixing p-value (None unless asked for), and the
    broad level (atlases with broad labels)."""

    labels: np.ndarray
    confidence: np.ndarray
    typicality: np.ndarray
    scores: np.ndarray
    similarity: np.ndarray
    vectors: np.ndarray
    k: int
    mixing: np.ndarray | None = None
    broad: BroadCall | None = None
    # of the atlas and the query as a whole, filled in by whoever called the cells
    classes: np.ndarray | None = None
    coverage: float = 1.0  # the share of the reference's top-gene weight the query measures
    excluded: list[str] = field(default_factory=list)  # excluded labels the atlas has
    recipe: dict = field(default_factory=dict)
    ontology_ids: dict[str, str] | None = None

    def rows(self, part: slice) -> Calls:
        """These calls for the cells in `part`."""
        broad = self.broad
        if broad is not None:
            broad = BroadCall(
                broad.key,
                broad.classes,
                broad.labels[part],
                broad.confidence[part],
                broad.typicality[part],
            )
        return Calls(
            self.labels[part],
            self.confidence[part],
            self.typicality[part],
            self.scores[part],
            self.similarity[part],
            self.vectors[part],
            self.k,
            None if self.mixing is None else self.mixing[part],
            broad,
            self.classes,
            self.coverage,
            self.excluded,
            self.recipe,
            self.ontology_ids,
        )


def excluded_cells(
    labels: LabelCodes, exclude_labels: tuple[str, ...], atlas: str
) -> tuple[list[str], np.ndarray | None]:
    """(the excluded labels the atlas has, a mask of the reference cells that may answer, or
    None when every cell may). Labels the atlas lacks are named in a log line, not refused:
    a blocklist such as "Doublet,Unknown" is meant to be reused across atlases."""
    wanted = list(exclude_labels)
    if not wanted:
        return [], None
    # by class codes, never per cell by name (a disk atlas keeps only the codes)
    levels = [(labels.classes, labels.codes)]
    if labels.has_broad:
        levels.append((labels.broad_classes, labels.broad_codes))
    names = {str(c) for classes, _ in levels for c in classes}
    present = [x for x in wanted if x in names]
    absent = [x for x in wanted if x not in names]
    if absent:
        log.info("Excluded label(s) not in atlas %s: %s", atlas, ", ".join(absent))
    blocked = np.zeros(labels.n_cells, dtype=bool)
    for classes, codes in levels:
        blocked |= np.isin(classes.astype(str), present)[codes]
    if blocked.all():
        raise CellvecError(
            f"--exclude-labels {','.join(wanted)} excludes every class of atlas {atlas!r}; "
            "leave at least one class to answer with."
        )
    if present:
        log.info(
            "Skipping %s reference cells labelled %s",
            f"{int(blocked.sum()):,}",
            ", ".join(present),
        )
    return present, (~blocked if blocked.any() else None)


def search_allowed(index, q: np.ndarray, k: int, allowed: np.ndarray | None):
    """(indices, similarities) of each query's k nearest reference cells among the `allowed`
    ones (all when None), best first; -1 / -inf pad rows with fewer than k allowed cells.

    Skipped cells are searched past: the search goes deeper (x4 a round) for the rows that
    have not yet found k allowed neighbours, up to the whole reference."""
    if allowed is None:
        return index.search(q, k)
    n_ref, n_ok = len(allowed), int(allowed.sum())
    want = min(k, n_ok)
    out_idx = np.full((len(q), k), -1, dtype=np.int64)
    out_sim = np.full((len(q), k), -np.inf, dtype=np.float32)
    todo = np.arange(len(q))
    depth = min(n_ref, k + int(np.ceil(k * n_ref / max(n_ok, 1))))
    while len(todo):
        idx, sim = index.search(q[todo], depth)
        ok = (idx >= 0) & allowed[np.maximum(idx, 0)]
        done = (ok.sum(1) >= want) | (depth >= n_ref)
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # allowed first, in rank order
        width = order.shape[1]
        keep = np.take_along_axis(ok, order, 1)
        rows = todo[done]
        out_idx[rows, :width] = np.where(keep, np.take_along_axis(idx, order, 1), -1)[done]
        out_sim[rows, :width] = np.where(keep, np.take_along_axis(sim, order, 1), -np.inf)[done]
        todo = todo[~done]
        depth = min(n_ref, depth * 4)
    return out_idx, out_sim


def truth_metrics(truth, labels, classes, atlas: str) -> dict | None:
    """Metrics against known labels (None without), warning about labels the atlas lacks."""
    if truth is None:
        return None
    missing = sorted(set(truth) - set(classes))
    if missing:
        log.warning(
            "Query labels not in atlas %s (they cannot be right): %s",
            atlas,
            ", ".join(missing[:10]),
        )
    return classification_metrics(truth, labels)


def typicality(
    idx: np.ndarray,
    sim: np.ndarray,
    ref_codes: np.ndarray,
    chosen: np.ndarray,
    calibration: np.ndarray | Calibration,
    *,
    shrink: float = 5.0,
) -> np.ndarray:
    """Per query cell, a conformal p-value of how typical it is of its chosen class.

    A cell's score is its similarity to its nearest neighbour of the chosen class,
    standardised by that class's calibration values (finite `calibration`: reference
    cells' similarity to their nearest same-class cell), the class spread shrunk
    towards the pooled one with `shrink` pseudo-cells so that small classes are not
    over-trusted. The p-value ranks it among all calibration cells' standardised
    scores, pooled over classes: (count at or below + 1) / (n + 1). Pooling keeps the
    resolution fine (a per-class rank could not go below 1 / (class size + 1), so a
    0.01 threshold never fired for classes under 99 cells). `calibration`: one value per
    reference cell (NaN outside the calibration cells) or a `Calibration` (several views
    of each calibration cell, for a query of another species)."""
    if not isinstance(calibration, Calibration):
        calibration = Calibration.of_cells(calibration, ref_codes)
    n_classes = int(max(ref_codes.max(initial=0), chosen.max(initial=0))) + 1
    cal_codes, cal, draws = calibration.codes, calibration.values, calibration.draws
    # class sizes and sums of squares in calibration cells (a cell's views count once)
    count = np.bincount(cal_codes, minlength=n_classes) / draws
    mean = np.bincount(cal_codes, weights=cal, minlength=n_classes) / np.maximum(count * draws, 1)
    sq = np.bincount(cal_codes, weights=(cal - mean[cal_codes]) ** 2, minlength=n_classes) / draws
    pooled = sq.sum() / max(count.sum() - 1, 1)
    spread = np.sqrt((sq + shrink * pooled) / (count + shrink)) + 1e-6
    if not len(cal):
        return np.full(len(chosen), np.nan)  # no calibration cells: typicality is unknown
    pool = np.sort((cal - mean[cal_codes]) / spread[cal_codes])
    same = (idx >= 0) & (ref_codes[np.maximum(idx, 0)] == chosen[:, None])
    score = np.where(same, sim, -np.inf).max(axis=1)
    z = (score - mean[chosen]) / spread[chosen]
    z[count[chosen] == 0] = -np.inf  # a class without calibration cells: nothing to vouch for it
    # the rank, smoothed by the normal tail of z: continuous below the lowest calibration
    # score, so a threshold finer than 1 / (n + 1) still means something with few cells
    return (np.searchsorted(pool, z, side="right") + ndtr(z)) / (len(pool) + 1)


def assign_labels(
    q: np.ndarray,
    idx: np.ndarray,
    sim: np.ndarray,
    classes: np.ndarray,
    codes: np.ndarray,
    min_confidence: float,
    *,
    calibration: np.ndarray | Calibration | None = None,
    min_typicality: float = 0.0,
    inherited: np.ndarray | None = None,
    scores: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(per-class scores, labels, confidences, typicalities) of query vectors `q` from their
    neighbours; typicality is 1 where no `calibration` is given. `inherited` (a class index
    per cell, -1 for none) is taken instead of the vote's winner and never made unassigned.
    `scores` (per cell and class, rows summing to 1) replace the neighbours' vote."""
    if scores is None:
        scores = vote(idx, sim, codes, len(classes))
    best = scores.argmax(1)
    inherit = np.zeros(len(best), dtype=bool)
    if inherited is not None:
        inherit = inherited >= 0
        best = np.where(inherit, inherited, best)
    conf = scores[np.arange(len(best)), best]
    labels = classes[best].astype(object)
    typical = (
        typicality(idx, sim, codes, best, calibration)
        if calibration is not None
        else np.ones(len(best))
    )
    # cells with no matched expression (only possible for backed files), or no neighbour left
    empty = ~q.any(axis=1) | ~(idx >= 0).any(axis=1)
    conf[empty] = 0.0
    typical[empty] = 0.0
    refused = (conf < min_confidence) | (typical < min_typicality) | empty
    labels[refused & ~inherit] = UNASSIGNED
    return scores, labels, conf, typical


TEMPERATURES = np.geomspace(0.005, 1.0, 61)  # the grid `Prototypes.of` fits on
FIT_CELLS = 20_000  # reference cells the temperature is fitted on, at most


@dataclass(frozen=True)
class Prototypes:
    """The `centroid` read-out: each class's mean vector made unit length, and the
    temperature that turns a cell's similarities to them into class probabilities
    (softmax of similarity / temperature)."""

    centroids: np.ndarray
    temperature: float

    @classmethod
    def of(cls, vectors: np.ndarray, codes: np.ndarray, n_classes: int) -> Prototypes:
        """Centroids of the reference `vectors` by class, and the temperature that makes
        their probabilities honest on the reference itself: each cell is scored against
        the centroids with itself left out of its own class's (temperature scaling, fitted
        by the likelihood of the cells' labels over `TEMPERATURES`; cells of one-cell
        classes, which have nothing left, are skipped). Seeded: the same atlas gives the
        same temperature."""
        vectors = np.asarray(vectors, dtype=np.float64)
        codes = np.asarray(codes)
        sums = np.zeros((n_classes, vectors.shape[1]))
        np.add.at(sums, codes, vectors)
        counts = np.bincount(codes, minlength=n_classes)
        rows = np.flatnonzero(counts[codes] > 1)
        if len(rows) > FIT_CELLS:
            rows = np.sort(np.random.default_rng(0).choice(rows, FIT_CELLS, replace=False))
        centroids = normalise_rows(sums)
        v, c = vectors[rows], codes[rows]
        sim = v @ centroids.T
        own = sums[c] - v  # each cell's own class without it
        sim[np.arange(len(rows)), c] = np.einsum("ij,ij->i", v, normalise_rows(own))
        temperature = 1.0
        if len(rows):
            present = np.flatnonzero(counts > 0)
            sim, truth = sim[:, present], np.searchsorted(present, c)
            at = np.arange(len(rows))
            nll = [-log_softmax(sim / t, axis=1)[at, truth].mean() for t in TEMPERATURES]
            temperature = float(TEMPERATURES[int(np.argmin(nll))])
        return cls(centroids, temperature)

    def scores(self, q: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """Class probabilities of query vectors `q` (rows sum to 1); classes not in `keep`
        (excluded labels) score 0."""
        logits = np.asarray(q, dtype=np.float64) @ self.centroids.T.astype(np.float64)
        return softmax(np.where(keep[None, :], logits / self.temperature, -np.inf), axis=1)


def assign_broad(
    q: np.ndarray,
    idx: np.ndarray,
    sim: np.ndarray,
    fine_labels: np.ndarray,
    fine_classes: np.ndarray,
    broad_classes: np.ndarray,
    broad_codes: np.ndarray,
    parent: np.ndarray,
    min_confidence: float,
    *,
    calibration: np.ndarray | Calibration | None = None,
    min_typicality: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(broad labels, confidences, typicalities) from the same neighbours as the fine call.

    Where the fine label was given and belongs to one broad class (`parent`, per fine
    class), the broad label is that class, so the two levels never disagree; its
    confidence is the broad vote's share for it (at least the fine label's). Elsewhere
    it is the broad vote's winner, unassigned below the same `min_confidence` and
    `min_typicality` (calibrated on the broad classes): a cell whose subtype is unclear
    or missing from the atlas still gets "T" when its neighbours agree on T."""
    fine_code = np.searchsorted(fine_classes.astype(str), fine_labels.astype(str))
    fine_code = np.clip(fine_code, 0, len(fine_classes) - 1)
    inherited = np.where(fine_labels != UNASSIGNED, parent[fine_code], -1)
    _, labels, conf, typical = assign_labels(
        q,
        idx,
        sim,
        broad_classes,
        broad_codes,
        min_confidence,
        calibration=calibration,
        min_typicality=min_typicality,
        inherited=inherited,
    )
    return labels, conf, typical


def call_cells(
    labels: LabelCodes,
    target: Target,
    q: np.ndarray,
    neighbours: tuple[np.ndarray, np.ndarray],
    options: MapOptions,
    *,
    mixing=None,
    class_sizes: np.ndarray | None = None,
) -> Calls:
    """The calls for query vectors `q` from their `neighbours` (indices, similarities into
    `target`, best first; their width is the vote's k): the vote (`class_sizes`, reference
    cells per class, for an atlas's cross-species view: a class smaller than k has its
    votes scaled up, `knn.vote`), the confidence and typicality thresholds, the mixing
    test when `options.min_mixing` > 0 (`mixing`: a function giving the query's p-values
    from its scores, see `Reference.mixing`), and the broad level."""
    idx, sim = neighbours
    if target.prototypes is not None:
        keep = ~np.isin(labels.classes.astype(str), options.exclude_labels)
        scores = target.prototypes.scores(q, keep)
    else:
        scores = vote(idx, sim, labels.codes, len(labels.classes), class_sizes)
    scores, fine, conf, typical = assign_labels(
        q,
        idx,
        sim,
        labels.classes,
        labels.codes,
        options.min_confidence,
        calibration=target.calibration,
        min_typicality=options.min_typicality,
        scores=scores,
    )
    p = None
    if options.min_mixing > 0:
        p, failing = mixing(scores)
        if failing is not None:
            fine[failing] = UNASSIGNED
    broad = None
    if labels.has_broad:
        b_labels, b_conf, b_typical = assign_broad(
            q,
            idx,
            sim,
            fine,
            labels.classes,
            labels.broad_classes,
            labels.broad_codes,
            labels.parent,
            options.min_confidence,
            calibration=target.broad_calibration,
            min_typicality=options.min_typicality,
        )
        broad = BroadCall(labels.broad_key, labels.broad_classes, b_labels, b_conf, b_typical)
    return Calls(fine, conf, typical, scores, sim[:, 0], q, idx.shape[1], p, broad)


def mixing_test(sample, unrefined: np.ndarray, min_mixing: float, atlas: str):
    """`call_cells`'s `mixing`: the query's mixing p-values (before the head, `unrefined`)
    against `sample` (the reference's vectors before the head and their class codes), and
    the cells to call unassigned (None when the query does not mix with the atlas)."""

    def test(scores: np.ndarray):
        p = mixing_pvalues(*sample, unrefined, scores.argmax(1))
        return p, unmixed(p, min_mixing, atlas)

    return test
