"""Map query cells onto an atlas: same recipe, k nearest reference cells, weighted vote.

One path for every way of mapping. `map_cells` reads the query and what is known of it
(truth labels, clusters), asks an atlas for its calls, and returns a `MappingResult`.
The atlas answering may be local (`Reference`: an `Atlas` in this process; the service
holds one per served atlas) or remote (`client.RemoteAtlas`, behind `cellvec serve`),
as a language model may be local or remote behind one call. A local `Reference` plans
the query's genes against the atlas (`plan`), encodes it, searches and calls the cells
with the functions of `cell_index.calls`, which the service's batches use too.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from cellvec.cell_index.atlas import DEFAULT_K, Atlas, readout_of
from cellvec.cell_index.calibration import SPECIES_SHIFT, species_calibrations
from cellvec.cell_index.calls import (
    Calls,
    LabelCodes,
    MapOptions,
    Prototypes,
    Target,
    call_cells,
    excluded_cells,
    mixing_test,
    search_allowed,
    truth_metrics,
)
from cellvec.cell_index.encoder import CellEncoder
from cellvec.cell_index.labels import labels_of
from cellvec.cell_index.readers import ExpressionSource, read_expression
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import apply_head
from cellvec.cell_index.result import MappingResult, ontology_ids
from cellvec.cell_index.table import SPECIES_SUFFIX
from cellvec.cell_index.vectors import GeneBasis
from cellvec.errors import CellvecError, InputFormatError
from cellvec.gene_store.orthologs import OrthologTable
from cellvec.metrics import UNASSIGNED

log = logging.getLogger(__name__)

FULL_COVERAGE = 0.999  # below this share of the reference's gene weight, compare over shared genes
LOW_COVERAGE = 0.5  # below this, warn: the labels rest on few of the genes that count
KEEP = 32  # gene plans and panels a `Reference` keeps (a service sees the same panels again)


@dataclass(frozen=True)
class Plan:
    """How a query's genes meet the atlas: the gene basis (which store gene each column
    is, through `orthologs` if given), the share of the reference's top-gene weight the
    query measures, and the panel the reference is re-aggregated over (None: compared
    over the atlas's own genes)."""

    basis: GeneBasis
    coverage: float = 1.0
    panel: np.ndarray | None = None


class Mapper(Protocol):
    """An atlas that calls cells: `Reference` here, `client.RemoteAtlas` through a service."""

    name: str

    @property
    def recipe(self) -> Recipe: ...

    @property
    def has_broad(self) -> bool: ...

    def call(self, source: ExpressionSource, options: MapOptions, *, ray=None) -> Calls: ...


class Reference:
    """What mapping needs of an atlas, however it is held: its encoder, label codes and
    search index over its own genes (`whole`), and the whole `Atlas` (`atlas()`, opened
    on demand) for what only its reference weights can give: panels and the mixing
    test's sample. `Reference.of(atlas)` wraps an atlas opened here; the service builds
    one over memory-mapped files (`service.atlases`)."""

    def __init__(
        self,
        name: str,
        meta: dict,
        encoder: CellEncoder,
        labels: LabelCodes,
        atlas,
        whole: Target | None = None,
        species: dict | None = None,
        cross=None,
    ):
        self.name, self.meta, self.encoder, self.labels = name, meta, encoder, labels
        self._atlas = atlas  # a callable giving the Atlas
        self._cross = cross  # a callable giving the cross-species view's Reference, or None
        self._cross_ref: list = []
        self._cross_lock = threading.Lock()
        self._whole = whole
        self._plans: dict = {}
        self._samples: dict = {}
        self._allowed: dict = {}
        self._prototypes: dict = {}  # panel key (None: the whole atlas) -> `Prototypes`
        # panel key -> `Target` for a query of another species (`target`); an `Atlas`
        # keeps them across the `Reference`s that `map_cells` makes of it, one a call
        self._species: dict = {} if species is None else species

    @classmethod
    def of(cls, atlas: Atlas) -> Reference:
        classes, codes = atlas.label_codes()
        broad = {}
        if atlas.has_broad:
            b_classes, b_codes, parent = atlas.broad_codes()
            broad = dict(
                broad_classes=b_classes,
                broad_codes=b_codes,
                parent=parent,
                broad_key=atlas.meta.get("broad_label_key"),
            )
        labels = LabelCodes(classes, codes, **broad)

        def cross():
            view = atlas.cross_species()
            return None if view is None else cls.of(view).view_of(atlas.name, atlas.meta)

        return cls(
            atlas.name,
            atlas.meta,
            atlas.encoder(),
            labels,
            lambda: atlas,
            species=atlas._species,
            cross=cross,
        )

    def view_of(self, name: str, meta: dict) -> Reference:
        """This reference (a cross-species view) under the name of the atlas it is a view
        of (logs, errors), with what was added to that atlas since it was built (its
        Cell Ontology ids)."""
        self.name = name
        if meta.get("ontology"):
            self.meta = {**self.meta, "ontology": meta["ontology"]}
        return self

    def through(self, orthologs) -> Reference:
        """The reference a query is compared with: for a query of another species (mapped
        through `orthologs`), the atlas's cross-species view where it has one
        (`build.SPECIES_VIEW`, opened on the first such query), else this one."""
        if orthologs is None or self._cross is None:
            return self
        with self._cross_lock:
            if not self._cross_ref:
                view = self._cross()
                if view is not None:
                    log.info(
                        "%s: a query of another species is compared with the atlas's "
                        "cross-species view (--weighting %s, refined with level-shifted views)",
                        self.name,
                        view.recipe.weighting,
                    )
                self._cross_ref.append(view)
        return self._cross_ref[0] or self

    @property
    def recipe(self) -> Recipe:
        return self.encoder.recipe

    @functools.cached_property
    def recipe_dict(self) -> dict:
        """`recipe.to_dict()`, made once for the service, which stamps it on every request's
        calls and only reads it (making it costs more than voting for one cell)."""
        return self.recipe.to_dict()

    @property
    def has_broad(self) -> bool:
        return self.labels.has_broad

    @property
    def k(self) -> int:
        """Neighbours in the vote unless the caller says: chosen by `atlas build --tune`,
        else 15."""
        return int(self.meta.get("k") or DEFAULT_K)

    @property
    def readout(self) -> str:
        """How the calls are read off the search: `knn` (the neighbours' vote) or
        `centroid` (the class centroids; chosen at build for small references)."""
        return readout_of(self.meta)

    @property
    def n_genes(self) -> int:
        return len(self.encoder.refinement.get("gene_rows", ()))

    def atlas(self) -> Atlas:
        return self._atlas()

    def calibrated(self) -> bool:
        return bool(np.isfinite(self.target(None).calibration).any())

    def require_calibration(self) -> None:
        if not self.calibrated():
            raise CellvecError(
                f"Atlas {self.name!r} has no held-out calibration cells, so typicality would "
                "be judged against cells refinement trained on (far too tight: most new cells "
                "would look atypical). Rebuild it with `cellvec atlas build ... "
                "--calibration-split 0.1` to use --min-typicality."
            )

    def plan(
        self, var_names: list[str], where: str = "dataset", orthologs: OrthologTable | None = None
    ) -> Plan:
        """Match the query's genes to the atlas's (`CellEncoder.basis`), and decide what it
        is compared with: the atlas as built when the query measures the genes that carry
        the reference's weight, else the reference re-aggregated over the shared genes."""
        key = (tuple(var_names), orthologs.digest if orthologs is not None else None)
        plan = self._plans.get(key)  # one look-up: a request's gene list is long to compare
        if plan is not None:
            return plan
        basis = self.encoder.basis(var_names, where, orthologs=orthologs)
        if orthologs is not None and self.encoder.recipe.weighting not in ("softmax", "sqrt"):
            log.warning(
                "%s goes through an ortholog table, but atlas %s has no cross-species view "
                "(`atlas build --cross-species`, the default): it is compared with the "
                "atlas's own %s weighting, which carries across species far worse "
                "(README, 'Other species')",
                where,
                self.name,
                self.encoder.recipe.weighting,
            )
        plan = Plan(basis)
        if basis.positions is not None and len(basis.positions) < self.n_genes:
            coverage = self.atlas().coverage(basis.positions)
            plan = Plan(basis, coverage, basis.positions if coverage < FULL_COVERAGE else None)
            (log.warning if coverage < LOW_COVERAGE else log.info)(
                "%s measures %s of the atlas's %s genes, carrying %.0f%% of the reference's "
                "top-gene weight%s",
                where,
                f"{len(basis.positions):,}",
                f"{self.n_genes:,}",
                100 * coverage,
                "; labels rest on few genes, check them"
                if coverage < LOW_COVERAGE
                else "; the reference is compared over the shared genes",
            )
        _keep(self._plans, key, plan)
        return plan

    def target(self, panel: np.ndarray | None, *, other_species: bool = False) -> Target:
        """The reference cells a query with this `panel` (`Plan.panel`) is compared with;
        for a query of `other_species` (mapped through orthologs), typicality calibrated
        on the calibration cells seen with their genes' levels shifted (computed once
        per panel, on the target's own index: a served atlas's memory-mapped one)."""
        key = None if panel is None else panel.tobytes()
        if other_species and key in self._species:
            return self._species[key]
        target = self._target(panel)
        if not other_species or not np.isfinite(target.calibration).any():
            return target
        _keep(self._species, key, self._species_target(target, panel), 4)
        return self._species[key]

    def _species_target(self, target: Target, panel: np.ndarray | None) -> Target:
        """`target` with both levels' typicality calibrated for a query of another species
        (`calibration.species_calibrations`), on its own index and calibration cells."""
        t = time.perf_counter()
        levels = [(target.calibration, self.labels.codes)]
        if self.has_broad:
            levels.append((target.broad_calibration, self.labels.broad_codes))
        atlas = self.atlas()
        cals = species_calibrations(
            [np.asarray(c) for c, _ in levels],
            [codes for _, codes in levels],
            target.index,
            lambda rows: atlas.shifted_views(rows, panel, SPECIES_SHIFT),
        )
        log.info(
            "%s: typicality of another species calibrated on %s level-shifted views of its "
            "calibration cells in %.1f s",
            self.name,
            f"{len(cals[0].values):,}",
            time.perf_counter() - t,
        )
        return replace(
            target, calibration=cals[0], broad_calibration=cals[1] if self.has_broad else None
        )

    def _target(self, panel: np.ndarray | None) -> Target:
        if panel is None:
            if self._whole is None:
                atlas = self.atlas()
                broad = atlas.broad_calibration() if atlas.has_broad else None
                self._whole = Target(atlas.index(), atlas.calibration(), broad)
            if self.readout == "centroid" and self._whole.prototypes is None:
                prototypes = self.prototypes(None, lambda: self.atlas().vectors)
                self._whole = replace(self._whole, prototypes=prototypes)
            return self._whole
        atlas = self.atlas()  # the atlas caches its last few panels
        vectors, index, calibration = atlas.vectors_over(panel)
        broad = atlas.broad_calibration(panel) if atlas.has_broad else None
        prototypes = self.prototypes(panel, lambda: vectors) if self.readout == "centroid" else None
        return Target(index, calibration, broad, panel, prototypes)

    @functools.cached_property
    def class_sizes(self) -> np.ndarray | None:
        """Reference cells per class where the atlas's vote scales up classes smaller
        than k (`meta["vote"]` "by_class_size": its cross-species view), else None."""
        if self.meta.get("vote") != "by_class_size":
            return None
        return np.bincount(np.asarray(self.labels.codes), minlength=len(self.labels.classes))

    def prototypes(self, panel: np.ndarray | None, vectors) -> Prototypes:
        """The `centroid` read-out over the reference `vectors()` (the atlas's, or
        re-aggregated over `panel`), fitted once per panel: a service sees the same panels
        again."""
        key = None if panel is None else panel.tobytes()
        if key not in self._prototypes:
            fitted = Prototypes.of(vectors(), self.labels.codes, len(self.labels.classes))
            log.info(
                "%s: read by class centroids%s, temperature %.3g",
                self.name,
                "" if panel is None else f" over a panel of {len(panel):,} genes",
                fitted.temperature,
            )
            _keep(self._prototypes, key, fitted)
        return self._prototypes[key]

    def allowed(self, exclude_labels: tuple[str, ...]) -> tuple[list[str], np.ndarray | None]:
        """(the excluded labels the atlas has, the reference cells that may answer)."""
        if exclude_labels not in self._allowed:
            _keep(
                self._allowed,
                exclude_labels,
                excluded_cells(self.labels, exclude_labels, self.name),
            )
        return self._allowed[exclude_labels]

    def mixing(self, panel: np.ndarray | None, unrefined: np.ndarray, min_mixing: float):
        """`call_cells`'s mixing test of a query (its vectors before the head) against a
        sample of the reference over the same genes."""
        key = None if panel is None else panel.tobytes()
        if key not in self._samples:
            _keep(self._samples, key, self.atlas().unrefined_sample(panel), 4)
        return mixing_test(self._samples[key], unrefined, min_mixing, self.name)

    def call(self, source: ExpressionSource, options: MapOptions, *, ray=None) -> Calls:
        """Map `source`'s cells: plan its genes, encode (on Ray workers with `ray`), search
        past excluded cells, vote, and make the unassigned calls. A query of another
        species is mapped by the atlas's cross-species view (`through`)."""
        view = self.through(options.orthologs)
        if view is not self:
            return view.call(source, options, ray=ray)
        if options.min_typicality > 0:
            self.require_calibration()
        excluded, allowed = self.allowed(options.exclude_labels)
        plan = self.plan(source.var_names, source.path, options.orthologs)
        if ray:
            from cellvec.cell_index.parallel import encode_cells

            unrefined = encode_cells(source, self.encoder, plan.basis, ray=ray, head=False)
        else:
            unrefined = self.encoder.unrefined(source, plan.basis)
        q = apply_head(self.encoder.refinement, unrefined)
        mixing = None
        if options.min_mixing > 0:
            mixing = self.mixing(plan.panel, unrefined, options.min_mixing)
        del unrefined  # only the mixing test needs it: not held through the search
        target = self.target(plan.panel, other_species=options.orthologs is not None)
        neighbours = search_allowed(target.index, q, options.k or self.k, allowed)
        calls = call_cells(
            self.labels, target, q, neighbours, options, mixing=mixing, class_sizes=self.class_sizes
        )
        calls.classes, calls.coverage, calls.excluded = self.labels.classes, plan.coverage, excluded
        calls.recipe, calls.ontology_ids = self.recipe.to_dict(), ontology_ids(self.meta)
        return calls


def _keep(cache: dict, key, value, at_most: int = KEEP) -> None:
    if len(cache) >= at_most:
        cache.pop(next(iter(cache)))
    cache[key] = value


def map_cells(
    query,
    atlas: Atlas | Mapper | str,
    *,
    store: str | Path | None = None,
    truth_key: str | None = None,
    broad_truth_key: str | None = None,
    label_map: dict[str, str] | None = None,
    cluster_key: str | None = None,
    recipe: Recipe | dict | None = None,
    ray: str | bool | None = None,
    **options,
) -> MappingResult:
    """Label each query cell from its k nearest atlas cells (distance-weighted vote).

    `query`: a path, an AnnData or an `ExpressionSource` (read as `read_expression`
    reads it). `atlas`: an `Atlas`, its name in `store`, or a remote atlas
    (`Client(url).atlas(name)`: the same call, answered by `cellvec serve`).
    `options` (`calls.MapOptions`): `k`, `min_confidence`, `min_typicality`,
    `min_mixing`, `exclude_labels`, `orthologs`.

    A cell is `unassigned` when its vote's confidence is below `min_confidence` or its
    typicality below `min_typicality`: typicality is the share of the reference's own
    cells of the chosen subtype that are no closer to their subtype than the query
    cell is (a conformal p-value, calibrated on the reference alone). With
    `min_typicality=0.01`, about 1% of the cells of subtypes the atlas knows are
    expected to come back unassigned when query and reference are alike; cells of a
    subtype the atlas lacks mostly do. It needs an atlas built with a calibration
    split (cells refinement never saw); typicality is NaN without one. A query mapped
    through `orthologs` sits further from every reference cell than a new cell of the
    atlas's species: its typicality is calibrated on the calibration cells seen with
    each gene's level shifted (`Reference.target`), so that 0.01 again costs
    the known cells about what it costs them within a species.

    A cell is also `unassigned` when its mixing p-value is below `min_mixing` (0.01 is a
    good start): among its nearest cells in the query and the atlas pooled, far more
    are query cells than the atlas's own cells of its label see (`cell_index.mixing`).
    This catches a subtype the atlas lacks that sits inside a known class (a left-out
    NK among CD8 T), where typicality cannot. It judges the query as a whole, so map
    whole files with it; when most of the query fails (query and atlas do not mix, as
    across chemistries), it is not applied and a warning says so.

    `k` defaults to the atlas's own (15, or what `atlas build --tune` chose).
    `recipe` (optional) states the settings the caller expects; a mismatch with the
    atlas's recipe is refused. `label_map` renames truth labels (cross-study names).
    `orthologs` (a table or its file, see `gene_store.orthologs`) matches query genes
    of another species to the atlas's store genes; the atlas's recipe is applied as is.
    `ray` (True for a local cluster, or an address: see `cellvec._ray`): the query's
    vectors are computed by Ray workers, shard by shard (same vectors within 1e-6, same
    labels); the search and the vote run here.
    `exclude_labels` (e.g. ["Doublet", "Unknown"]) are never given: reference cells that
    carry one are skipped in the search (more neighbours are searched so that k others
    remain), not outvoted. An atlas built with broad labels gives each cell a broad label
    too (`result.broad`), scored against `broad_truth_key` if given. `cluster_key` names
    a query obs column (e.g. leiden) summarised per cluster (`result.cluster_summary()`).
    """
    t0 = time.perf_counter()
    options = MapOptions.of(**options)
    mapper = _mapper(atlas, store)
    if recipe is not None:
        expected = (
            recipe
            if isinstance(recipe, Recipe)
            else Recipe.from_dict({**mapper.recipe.to_dict(), **recipe})
        )
        mapper.recipe.require_same(expected, mapper.name)
    source = read_expression(query)
    truth = (
        labels_of(source, truth_key, label_map=label_map, option="--truth-key")
        if truth_key
        else None
    )
    clusters = cluster_values(source, cluster_key) if cluster_key else None
    if broad_truth_key and not mapper.has_broad:
        raise CellvecError(
            f"Atlas {mapper.name!r} has one level of labels; --broad-truth-key needs an atlas "
            "built with `cellvec atlas build ... --broad-label-key KEY`."
        )
    b_truth = (
        labels_of(source, broad_truth_key, option="--broad-truth-key") if broad_truth_key else None
    )
    calls = mapper.call(source, options, ray=ray)
    if calls.broad is not None:
        calls.broad.truth = b_truth
        calls.broad.metrics = truth_metrics(
            b_truth, calls.broad.labels, calls.broad.classes, mapper.name
        )
    secs = time.perf_counter() - t0
    log.info(
        "Mapped %s cells onto %s in %.1f s (%.1f%% unassigned)",
        f"{len(calls.labels):,}",
        mapper.name,
        secs,
        100 * float((calls.labels == UNASSIGNED).mean()) if len(calls.labels) else 0.0,
    )
    result = _result(mapper.name, source, calls, options, truth, secs)
    result.cluster_key, result.clusters = cluster_key, clusters
    return result


def _result(atlas: str, source, calls: Calls, options: MapOptions, truth, secs) -> MappingResult:
    return MappingResult(
        atlas=atlas,
        cell_ids=source.obs_names,
        labels=calls.labels,
        confidence=calls.confidence,
        classes=calls.classes,
        scores=calls.scores,
        vectors=calls.vectors,
        neighbour_similarity=calls.similarity,
        recipe=calls.recipe,
        k=calls.k,
        min_confidence=options.min_confidence,
        typicality=calls.typicality,
        min_typicality=options.min_typicality,
        mixing=calls.mixing,
        min_mixing=options.min_mixing,
        gene_coverage=calls.coverage,
        truth=truth,
        metrics=truth_metrics(truth, calls.labels, calls.classes, atlas),
        seconds=secs,
        orthologs=options.orthologs.source if options.orthologs is not None else None,
        excluded_labels=calls.excluded,
        broad=calls.broad,
        source=source,
        ontology_ids=calls.ontology_ids,
    )


def _mapper(atlas, store) -> Mapper:
    """The atlas as something that calls cells."""
    if isinstance(atlas, str):
        if store is None:
            raise CellvecError("map_cells needs store= when the atlas is given by name.")
        if atlas.endswith(SPECIES_SUFFIX):
            of = atlas[: -len(SPECIES_SUFFIX)]
            raise CellvecError(
                f"{atlas!r} is the cross-species view of atlas {of!r}, not an atlas: map onto "
                f"{of!r} with --orthologs (a query of another species is compared with the view)."
            )
        atlas = Atlas.open(store, atlas)
    return Reference.of(atlas) if isinstance(atlas, Atlas) else atlas


def cluster_values(source: ExpressionSource, key: str) -> np.ndarray:
    """The query's `key` obs column as strings (missing values as "nan"), or an error
    naming the columns there are."""
    if key not in source.obs.columns:
        raise InputFormatError(
            f"{source.path}: no obs column {key!r} to summarise by; obs columns are: "
            f"{', '.join(map(str, source.obs.columns)) or 'none'}. Name one with --cluster-key."
        )
    return source.obs[key].astype(str).to_numpy(dtype=object)


LABEL_MAP_SHAPE = (
    'a label map is a JSON object {"query label": "atlas label", ...} or a two-column CSV/TSV.'
)


def read_label_map(path: str | Path) -> dict[str, str]:
    """A label-harmonisation map: JSON {from: to} or a two-column CSV/TSV."""
    import json

    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            given = json.loads(path.read_text())
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise InputFormatError(f"{path}: not readable JSON ({e}); {LABEL_MAP_SHAPE}") from e
        if not isinstance(given, dict):
            raise InputFormatError(f"{path}: a JSON {type(given).__name__}; {LABEL_MAP_SHAPE}")
        return {str(k): str(v) for k, v in given.items()}
    import csv

    sep = "," if path.suffix.lower() == ".csv" else "\t"
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh, delimiter=sep) if r]
    if any(len(r) < 2 for r in rows):
        raise InputFormatError(f"{path}: a label map needs two columns (query label, atlas label).")
    return {r[0]: r[1] for r in rows}
