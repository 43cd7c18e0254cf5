"""`atlas build`: embed a labelled reference and write it as an atlas table in the store.

The steps: read the reference and its labels (`labels.reference_labels`), choose the
recipe (`tune.tune_recipe` with `--tune`) and, for a small reference, the read-out
(`tune.choose_readout`), fit it (`fitting.fit_encoder`), write the table in one commit
(here, or by Ray workers: `parallel.write_atlas`), then its disk index when it has one
(`disk_index.build_disk_index`). `index_atlas` (re)indexes an atlas already in the store.

What to read comes as an `ExpressionSource` (built once by the caller, with its layer,
raw matrix and gene column), how to embed as a `Recipe`, and how to fit and write as
`BuildOptions`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cellvec._kernels import PINS, pinned
from cellvec.cell_index.atlas import DEFAULT_K, Atlas
from cellvec.cell_index.disk_index import (
    INDEX_KINDS,
    DiskIndexParams,
    build_disk_index,
    choose_kind,
    choose_params,
)
from cellvec.cell_index.fitting import FittedReference, fit_encoder
from cellvec.cell_index.labels import label_column, reference_labels
from cellvec.cell_index.parallel import write_atlas
from cellvec.cell_index.prior import load_prior
from cellvec.cell_index.readers import ExpressionSource, read_expression
from cellvec.cell_index.recipe import MAX_K, READOUTS, Recipe, is_count
from cellvec.cell_index.table import (
    ATLAS_PREFIX,
    MAX_TABLE_NAME,
    SPECIES_SUFFIX,
    atlas_schema,
    atlas_table,
    drop_view_of_old_build,
    is_atlas_name,
    is_its_view,
    species_view_id,
    species_view_name,
    stored_atlas,
    weight_lists,
)
from cellvec.cell_index.tune import choose_readout, tune_recipe
from cellvec.errors import CellvecError, StoreError
from cellvec.gene_store.store import GeneStore
from cellvec.storage import META_KEY, Store, StoreLocation, replace_table, store_location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """How `build_atlas` fits and writes an atlas, beyond its recipe.

    `k`: the atlas's default number of neighbours for mapping (else 15). `tune`: choose
    the recipe's `top_genes` and `k` by 3-fold cross-validation on the reference
    (`cell_index.tune`), recorded in the recipe and the atlas metadata.
    `calibration_split`: keep that share of each class out of refinement to calibrate
    typicality (`map_cells(min_typicality=...)` needs it). `seed` and `refine_options`:
    of the refinement (`refine.fit_refinement`). `readout`: how mapping reads the calls
    off, "knn" (the neighbours' vote), "centroid" (the class centroids) or "auto": kNN,
    except that a reference whose median class has fewer than `FEW_CELLS` cells chooses between
    the refined kNN and the unrefined centroids by cross-validation on itself
    (`tune.choose_readout`), recorded in the recipe and the atlas metadata.

    `index`: "memory" (searched with faiss in memory), "disk" (a Lance IVF_PQ index on
    the table, see `disk_index.py`; built on the Ray cluster too when `ray` is given)
    or "auto" (disk above the memory budget).

    `ray` (True for a local cluster, or an address: see `cellvec._ray`): Ray workers
    read the reference's rows, compute its cells' top genes and final vectors and write
    the table's fragments, committed once; refinement is trained here, in one process.
    The atlas equals the one built without Ray (same rows, vectors within 1e-6).

    `prior`: the name of a pre-trained prior in the store (`cellvec prior build`); the
    atlas's refinement starts from it (`cell_index.prior`), recorded in the recipe.

    `cross_species` (default on): also fit and write the atlas's cross-species view
    (`SPECIES_VIEW`), which `map --orthologs` compares a query of another species with;
    it costs one more refinement and a second set of vectors. Not made for an atlas
    without refinement, one started from a prior, or one whose own recipe is already the
    view's."""

    k: int | None = None
    tune: bool = False
    readout: str = "auto"
    calibration_split: float = 0.0
    seed: int = 0
    refine_options: dict | None = None
    index: str = "auto"
    ray: str | bool | None = None
    prior: str | None = None
    cross_species: bool = True


# The recipe of an atlas's cross-species view: each cell's top genes weighted by softmax,
# and the refinement trained on views whose genes' levels shift together (log-normal,
# sigma 1). On the Baron pancreas pair (3 seeds, results/cross_species.md) it takes human
# cells onto a mouse atlas from 0.654 / 0.778 (macro-F1 / accuracy) to 0.826 / 0.912 and
# mouse onto human from 0.661 / 0.863 to 0.703 / 0.940, and costs within a species
# (results/weightings_level_shift): so a view of its own, used only through orthologs.
SPECIES_VIEW = {"weighting": "softmax", "level_shift": 1.0}
# ... and its vote counts a class of fewer reference cells than k as if it had k (`knn.vote`):
# a query of another species lies far from every reference cell, so its neighbours spread
# over classes and a class of 2-7 cells never wins. Mouse onto the Baron human atlas (4 T
# cells, 2 schwann), 3 seeds: macro-F1 0.700-0.705 -> 0.746-0.772, accuracy level; human
# onto mouse -0.008 to +0.023 (results/cross_species.md: cellvec against
# cellvec_softmax_shift, the same atlas read by the plain vote).
SPECIES_VOTE = "by_class_size"


@dataclass
class _Reference:
    """The labelled reference an atlas is built from: its kept cells, their labels, broad
    labels (or None), batches, and the labels excluded ({label: cells})."""

    source: ExpressionSource
    labels: np.ndarray
    broad: np.ndarray | None
    batches: np.ndarray
    excluded: dict

    @property
    def dataset(self) -> str:
        return Path(str(self.source.path)).stem


def build_atlas(
    reference,
    *,
    store: Store | str | Path | StoreLocation,
    name: str,
    label_key: str,
    broad_label_key: str | None = None,
    batch_key: str | None = None,
    exclude_labels=(),
    model: str | None = None,
    recipe: Recipe | None = None,
    options: BuildOptions | None = None,
) -> Atlas:
    """Embed a labelled `reference` (an `ExpressionSource`, an AnnData or a path, read by
    `read_expression`) and write it as atlas `name` in the store.

    `recipe` says how cells become vectors (default `Recipe()`); its model, dimension and
    hashes come from the store's gene table of `model` and from the fit. `options`: see
    `BuildOptions`.

    `exclude_labels` (e.g. ["Doublet", "Unknown"]) drops the reference cells that carry
    one before anything is fitted; the atlas records what was dropped
    (`meta["excluded_labels"]`). `broad_label_key` names a second, coarser label (e.g.
    `cell_type_broad` over `cell_type`), stored in column `label_broad`: mapping then
    gives a broad label too, even where the fine one is unassigned. A cell without a
    broad label is its own broad class (its fine label). `batch_key`: the obs column
    recorded as each cell's batch."""
    options = options or BuildOptions()
    _check_inputs(name, options)
    if pinned() is False:
        log.warning(
            "numpy was imported before cellvec, so it runs this CPU's own kernels: atlas %s "
            "may differ from one built with the same seed on another machine. Import "
            "cellvec first, or start Python with %s set.",
            name,
            " ".join(f"{k}={v}" for k, v in PINS.items()),
        )
    t0 = time.perf_counter()
    store = Store.of(store)
    genes = GeneStore(store).load(model, every_gene=True)  # not a bundle's partial table
    prior = load_prior(store, options.prior, genes) if options.prior else None
    ref = _read_reference(
        reference,
        label_key=label_key,
        broad_label_key=broad_label_key,
        batch_key=batch_key,
        exclude_labels=exclude_labels,
    )
    choice = _choose_recipe(ref, genes, recipe or Recipe(), options, prior)
    keys = dict(label_key=label_key, batch_key=batch_key, broad_label_key=broad_label_key)
    # both fits before either write: a build that fails while fitting (memory, Ctrl-C)
    # leaves the atlas and view already in the store as they were, still a pair
    view = _fit_species_view(store, name, ref, genes, choice, options, prior, keys)
    fit = fit_encoder(
        ref.source,
        ref.labels,
        genes,
        choice.recipe,
        store=store,
        seed=options.seed,
        refine_options=options.refine_options,
        calibration_split=options.calibration_split,
        ray=options.ray,
        prior=prior,
    )
    meta = _atlas_meta(ref, fit, **keys, choice=choice, index=options.index)
    if options.refine_options:
        # the refinement choices given (e.g. --level-shift): the card's folds fit with them too
        meta["refine_options"] = dict(options.refine_options)
    first = view is not None and ATLAS_PREFIX + name not in store.table_names()
    try:
        if view is not None:
            meta["cross_species"] = _write_species_view(store, name, ref, view, options.ray)
        memory = _write(store, name, ref, fit, meta, options.ray)
    except BaseException:
        # the first build of `name`, stopped between its view and the atlas: no view of
        # an atlas that is not there (once the atlas is written, the two are a pair; a
        # rebuild keeps the old pair, `is_its_view` judges)
        if first:
            names = store.table_names()
            view_table = ATLAS_PREFIX + species_view_name(name)
            if ATLAS_PREFIX + name not in names and view_table in names:
                store.db.drop_table(view_table)
        raise
    if view is None:
        drop_view_of_old_build(store, name)
    log.info(
        "Atlas %s: %s cells, %d classes, dim %d, %s index, in %.1f s",
        name,
        f"{ref.source.n_obs:,}",
        len(meta["classes"]),
        fit.dimension,
        meta["index"]["kind"],
        time.perf_counter() - t0,
    )
    # the in-memory atlas that calibrated typicality has already built the search index
    index = memory.index() if memory is not None else None
    return Atlas.open(store, name, encoder=fit.encoder, index=index)


def _write(store: Store, name: str, ref: _Reference, fit, meta: dict, ray) -> Atlas | None:
    """Write the atlas table (`_write_table`), then its disk index if it has one."""
    memory = _write_table(store, name, ref, fit, meta, ray)
    if meta["index"]["kind"] == "disk":
        # Written after the table: a reader in between searches the table exactly (slower,
        # not wrong) until the index is committed.
        build_disk_index(
            store.open_table(ATLAS_PREFIX + name).to_lance(),
            DiskIndexParams.from_dict(meta["index"]),
            ray_address=ray,
            storage_options=store.location.options() or None,
        )
    return memory


def _fit_species_view(
    store: Store, name: str, ref: _Reference, genes, choice: _Choice, options, prior, keys
) -> tuple | None:
    """(fit, metadata) of atlas `name`'s cross-species view (`SPECIES_VIEW`), not yet
    written (`_write_species_view`); None when none is made (see
    `BuildOptions.cross_species`)."""
    if not options.cross_species:
        return None
    recipe, refine_options, why = species_view_recipe(choice.recipe, options.refine_options, prior)
    if why:
        log.info("Atlas %s: no cross-species view, as %s", name, why)
        return None
    t = time.perf_counter()
    log.info(
        "Atlas %s: fitting its cross-species view (--weighting %s --level-shift %g), used "
        "by `map --orthologs`; `--no-cross-species` skips it",
        name,
        SPECIES_VIEW["weighting"],
        SPECIES_VIEW["level_shift"],
    )
    fit = fit_encoder(
        ref.source,
        ref.labels,
        genes,
        recipe,
        store=store,
        seed=options.seed,
        refine_options=refine_options,
        calibration_split=options.calibration_split,
        ray=options.ray,
    )
    meta = _atlas_meta(
        ref, fit, **keys, choice=replace(choice, recipe=recipe, tuning=None), index=options.index
    )
    meta.update(refine_options=refine_options, species_view_of=name, vote=SPECIES_VOTE)
    meta["species_view_id"] = species_view_id(meta, ref.source.obs_names, ref.labels)
    log.info("Atlas %s: cross-species view fitted in %.1f s", name, time.perf_counter() - t)
    return fit, meta


def _write_species_view(store: Store, name: str, ref: _Reference, view: tuple, ray) -> dict:
    """Write the cross-species `view` (`_fit_species_view`) as atlas table `<name>__species`,
    just before the atlas, whose metadata then names it by the id both carry (the
    returned `cross_species` entry): until the atlas is written, the atlas in the store
    answers alone (`table.is_its_view`)."""
    fit, meta = view
    _write(store, species_view_name(name), ref, fit, meta, ray)
    return {"id": meta["species_view_id"], **SPECIES_VIEW}


def species_view_recipe(recipe: Recipe, refine_options: dict | None, prior=None):
    """(recipe, refinement options, None) of the cross-species view of an atlas fitted
    with `recipe` and `refine_options` (`SPECIES_VIEW`), or (None, None, why not): an atlas
    without refinement or started from a prior gets none, nor one whose own recipe is
    already the view's. What `build_atlas` and `evaluate`'s folds both fit."""
    shift = float((refine_options or {}).get("level_shift") or 0.0)
    if recipe.refine == "none":
        return None, None, "it has no refinement (--refine none)"
    if prior is not None:
        return None, None, "its refinement starts from a prior"
    if recipe.weighting == SPECIES_VIEW["weighting"] and shift >= SPECIES_VIEW["level_shift"]:
        return None, None, "its own recipe is the cross-species one"
    view = replace(recipe, weighting=SPECIES_VIEW["weighting"])
    return view, {**(refine_options or {}), "level_shift": SPECIES_VIEW["level_shift"]}, None


def _check_inputs(name: str, options: BuildOptions) -> None:
    """Refuse an unknown index kind or read-out, a name that cannot be a table, or a k or
    calibration split out of range, before any work."""
    if options.k is not None and not is_count(options.k, MAX_K):
        raise CellvecError(f"k {options.k}: give a number of neighbours from 1 to {MAX_K}.")
    if not 0 <= options.calibration_split < 1:
        raise CellvecError(
            f"Calibration split {options.calibration_split:g}: give a share of each class "
            "from 0 up to (not including) 1; 0.1 is a good start."
        )
    if options.index not in INDEX_KINDS:
        raise CellvecError(f"Index {options.index!r}: choose one of {', '.join(INDEX_KINDS)}.")
    if options.readout not in ("auto", *READOUTS):
        raise CellvecError(
            f"Read-out {options.readout!r}: choose one of auto, {', '.join(READOUTS)}."
        )
    if not is_atlas_name(name):
        raise CellvecError(
            f"Atlas name {name!r}: use up to {MAX_TABLE_NAME} letters, digits and underscores, "
            f"not ending in {SPECIES_SUFFIX} (it becomes a SQL view name and a folder name; "
            f"`<name>{SPECIES_SUFFIX}` holds an atlas's cross-species view)."
        )
    if options.refine_options:
        from cellvec.cell_index.refine import RefineOptions

        RefineOptions.from_dict(options.refine_options)  # names and values, before any work


def _read_reference(
    reference, *, label_key: str, broad_label_key, batch_key, exclude_labels
) -> _Reference:
    """The reference's cells and labels, every input check done: they all come before
    fitting, which writes artifact tables into the store."""
    source = read_expression(reference)
    if batch_key:
        label_column(source, batch_key, "--batch-key")
    source, labels, broad, excluded = reference_labels(
        source, label_key, broad_label_key=broad_label_key, exclude_labels=exclude_labels
    )
    batches = (
        source.obs[batch_key].astype(str).to_numpy()
        if batch_key
        else np.full(source.n_obs, "", dtype=object)
    )
    return _Reference(source, labels, broad, batches, excluded)


@dataclass(frozen=True)
class _Choice:
    """What `_choose_recipe` settled: the recipe, k (None: the default), the tuning scores,
    the read-out and the scores it was chosen by (None where nothing was tuned)."""

    recipe: Recipe
    k: int | None = None
    tuning: dict | None = None
    readout: str = "knn"
    readout_scores: dict | None = None


def _choose_recipe(
    ref: _Reference, genes, recipe: Recipe, options: BuildOptions, prior=None
) -> _Choice:
    """The recipe on the store's gene table, the atlas's k and its read-out: `options.tune`
    chooses top-N and k on the reference itself, `options.readout` "auto" the read-out of a
    small reference (each fold starting from `prior`, as the atlas will)."""
    # Top genes are always read from log-normalised values (counts are normalised on reading).
    recipe = replace(
        recipe,
        model=genes.model,
        dimension=genes.dimension,
        adapt_genes=recipe.adapt_genes and recipe.refine != "none",
    )
    k, tuning = options.k, None
    fitting = {"seed": options.seed, "refine_options": options.refine_options, "prior": prior}
    if options.tune:
        top, k, tuning = tune_recipe(ref.source, ref.labels, genes, recipe, **fitting)
        recipe = Recipe.from_dict({**recipe.to_dict(), "top_genes": top})
    if options.readout != "auto":
        return _Choice(recipe, k, tuning, options.readout)
    recipe, readout, scores = choose_readout(ref.source, ref.labels, genes, recipe, **fitting)
    return _Choice(recipe, k, tuning, readout, scores)


def _atlas_meta(
    ref: _Reference,
    fit: FittedReference,
    *,
    label_key: str,
    batch_key: str | None,
    broad_label_key: str | None,
    choice: _Choice,
    index: str,
) -> dict:
    """The atlas table's metadata: recipe, labels and class counts, provenance, refinement
    report, k, read-out and tuning, what was excluded, the broad level and the index."""
    classes, counts = np.unique(ref.labels, return_counts=True)
    meta = {
        "recipe": fit.encoder.recipe.to_dict(),
        "label_key": label_key,
        "batch_key": batch_key,
        "n_cells": int(ref.source.n_obs),
        "classes": {str(c): int(n) for c, n in zip(classes, counts)},
        "source": ref.source.path,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
        "refinement": fit.report or None,
        "k": int(choice.k or DEFAULT_K),
        "tuning": choice.tuning,
        "readout": choice.readout,
    }
    if choice.readout_scores:
        meta["readout_scores"] = choice.readout_scores
    if ref.excluded:
        meta["excluded_labels"] = ref.excluded
    if ref.broad is not None:
        meta["broad_label_key"] = broad_label_key
        names, counts = np.unique(ref.broad.astype(str), return_counts=True)
        meta["broad_classes"] = {str(c): int(n) for c, n in zip(names, counts)}
    meta["index"] = index_meta(index, ref.source.n_obs, fit.dimension)
    return meta


def _write_table(store: Store, name: str, ref: _Reference, fit, meta: dict, ray) -> Atlas | None:
    """Write the atlas table in one commit; returns the in-memory atlas that calibrated
    typicality (None when Ray workers wrote it without one)."""
    schema = atlas_schema(fit.dimension, meta, broad=ref.broad is not None)
    if ray:
        return _write_on_ray(store, name, ref, fit, schema, ray)
    memory = Atlas.from_fit(name, fit, ref.labels, broad_labels=ref.broad)
    top_genes, top_weights = weight_lists(fit.weights)
    table = atlas_table(
        schema,
        cell_ids=ref.source.obs_names,
        labels=ref.labels,
        batches=ref.batches,
        dataset=ref.dataset,
        vectors=fit.vectors,
        top_genes=top_genes,
        top_weights=top_weights,
        calibration=memory.calibration(),
        broad_labels=ref.broad,
    )
    replace_table(store.db, ATLAS_PREFIX + name, table)
    return memory


def _write_on_ray(store: Store, name: str, ref: _Reference, fit, schema, ray) -> Atlas | None:
    """The atlas table written by Ray workers (`parallel.write_atlas`); the in-memory atlas
    that calibrated typicality when held-out cells needed every vector, else None."""
    memory = None

    def calibrate(vectors):
        nonlocal memory
        fit.vectors = vectors
        memory = Atlas.from_fit(name, fit, ref.labels, broad_labels=ref.broad)
        return memory.calibration()

    held = fit.held_out is not None and bool(fit.held_out.any())
    write_atlas(
        store.location.table_uri(ATLAS_PREFIX + name),
        schema,
        fit.blocks,
        basis=fit.basis(),
        params=fit.encoder.refinement,
        cell_ids=ref.source.obs_names,
        labels=ref.labels,
        broad_labels=ref.broad,
        batches=ref.batches,
        dataset=ref.dataset,
        calibrate=calibrate if held else None,
        storage_options=store.location.options() or None,
        ray=ray,
    )
    return memory


def index_meta(kind: str, n_cells: int, dim: int) -> dict:
    """The `index` entry of an atlas's metadata: {"kind": "memory"}, or {"kind": "disk"}
    with the Lance index parameters chosen for its size (`disk_index.choose_params`)."""
    kind = choose_kind(kind, n_cells, dim)
    if kind == "memory":
        return {"kind": "memory"}
    return {"kind": "disk", **choose_params(n_cells, dim).to_dict()}


def index_atlas(
    store: str | Path | StoreLocation,
    name: str,
    *,
    index: str = "disk",
    params: dict | None = None,
    ray: str | bool | None = None,
    with_view: bool = True,
) -> dict:
    """(Re)index an atlas already in the store, e.g. one written in chunks by a cluster:
    builds its Lance index when `index` comes out "disk" (`params` overrides the chosen
    parameters), then records the choice in its metadata. Returns the `index` entry.

    The index is committed before the metadata names it, so a reader sees the atlas
    searched in memory, or exactly through its table, until the index is there. The
    atlas's cross-species view is indexed the same way first, when it is the atlas's own
    (`table.is_its_view`: another build's view, or none, is left alone with a warning,
    and the atlas is indexed all the same); `with_view` False leaves the view alone (a
    bundle's copy, whose view was just indexed with its own parameters)."""
    ds, meta = stored_atlas(store, name)
    if with_view and meta.get("cross_species"):
        try:
            view_meta = stored_atlas(store, species_view_name(name))[1]
        except StoreError:
            view_meta = None
        if is_its_view(name, meta, view_meta, store):
            index_atlas(store, species_view_name(name), index=index, params=params, ray=ray)
    entry = index_meta(index, ds.count_rows(), ds.schema.field("vector").type.list_size)
    if entry["kind"] == "disk":
        entry.update(params or {})
        ds = build_disk_index(
            ds,
            DiskIndexParams.from_dict(entry),
            ray_address=ray,
            storage_options=store_location(store).options() or None,
        )
    ds.update_schema_metadata({META_KEY.decode(): json.dumps({**meta, "index": entry})})
    return entry
