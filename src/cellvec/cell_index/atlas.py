"""The `Atlas`: a reference atlas opened from the store, ready for KNN search.

Its table (`table.py`: cell ids, labels, vectors, top-gene weights, the recipe in the
metadata) is written by `build.build_atlas`. Nearest-neighbour search runs on the atlas
vectors in memory: exact below 200,000 cells, a faiss IVF index above (built in ~3 s
per 1M cells when the atlas is loaded). Measured here, per-query LanceDB search takes
4-12 ms whatever its index, the in-memory index ~0.2 ms, so an atlas that fits in memory
gets no Lance vector index. One that does not (`index="disk"`, or "auto" above the memory
budget of `disk_index.py`) is searched through a Lance IVF_PQ index on its table
instead, and opening it reads only its label codes and typicality calibration; the
metadata's `index` records which (`{"kind": "memory"}` or `{"kind": "disk", ...}`).

A query that measures fewer genes is compared with the reference re-aggregated over
them (`vectors_over`, `panels.py`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from cellvec._arrow import fixed_size_rows, string_values
from cellvec.cell_index.calibration import self_similarity
from cellvec.cell_index.disk_index import DiskIndex, DiskIndexParams
from cellvec.cell_index.encoder import CellEncoder, load_encoder
from cellvec.cell_index.fitting import FittedReference
from cellvec.cell_index.knn import build_index
from cellvec.cell_index.labels import class_parents
from cellvec.cell_index.mixing import sample_rows
from cellvec.cell_index.panels import (
    even_rows,
    fits_in_memory,
    panel_key,
    reaggregate,
    remember,
    weight_share,
)
from cellvec.cell_index.recipe import READOUTS, RECIPE_VERSION, Recipe
from cellvec.cell_index.refine import apply_head, augment_weights
from cellvec.cell_index.table import is_its_view, species_view_name, stored_atlas, weight_matrix
from cellvec.errors import CellvecError, StoreError
from cellvec.fetch import resolve_atlas
from cellvec.gene_store.store import GeneStore
from cellvec.storage import StoreLocation, store_location

log = logging.getLogger(__name__)

DEFAULT_K = 15


class _StoredVectors:
    """A disk atlas's vectors as `self_similarity` reads them: its length, and the rows of
    a sample (read from the table), never the whole column."""

    def __init__(self, atlas: Atlas):
        self.atlas = atlas

    def __len__(self) -> int:
        return self.atlas.n_cells

    def __getitem__(self, rows) -> np.ndarray:
        return fixed_size_rows(self.atlas.dataset().take(np.asarray(rows), columns=["vector"])[0])


@dataclass
class Atlas:
    """An atlas opened from the store, ready for KNN: vectors in memory, or, for a disk
    atlas (`on_disk`), only label codes and calibration, the rest read when asked for."""

    name: str
    store: StoreLocation | str  # "" for an atlas held in memory only (`from_fit`)
    meta: dict
    _cell_ids: np.ndarray | None = field(default=None, repr=False)
    _labels: np.ndarray | None = field(default=None, repr=False)
    _batches: np.ndarray | None = field(default=None, repr=False)
    _vectors: np.ndarray | None = field(default=None, repr=False)
    version: int = 0
    _broad_labels: np.ndarray | None = field(default=None, repr=False)  # see broad_labels
    _index: object = field(default=None, repr=False)
    _encoder: CellEncoder | None = field(default=None, repr=False)
    _codes: tuple | None = field(default=None, repr=False)
    _weights: sp.csr_matrix | None = field(default=None, repr=False)
    _panels: dict = field(default_factory=dict, repr=False)
    _calibration: np.ndarray | None = field(default=None, repr=False)
    _held_out: np.ndarray | None = field(default=None, repr=False)
    _broad_codes: tuple | None = field(default=None, repr=False)
    _broad: dict = field(default_factory=dict, repr=False)  # broad calibration by panel key
    _species: dict = field(default_factory=dict, repr=False)  # `Reference.target`'s, by panel
    _cross: list = field(default_factory=list, repr=False)  # `cross_species()`, once looked up
    _ds: object = field(default=None, repr=False)  # the table at `version` (`dataset()`)

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_dict(self.meta["recipe"])

    @property
    def on_disk(self) -> bool:
        """Searched through the Lance index of its table, never loaded whole."""
        return (self.meta.get("index") or {}).get("kind") == "disk"

    @property
    def n_cells(self) -> int:
        return len(self._vectors) if self._vectors is not None else len(self.label_codes()[1])

    @property
    def dimension(self) -> int:
        """The cell vectors' dimension (the head's output, not the gene vectors')."""
        if self._vectors is not None:
            return self._vectors.shape[1]
        return self.dataset().schema.field("vector").type.list_size

    @property
    def vectors(self) -> np.ndarray:
        """The reference cells' vectors (cells x dim). A disk atlas reads them all on the
        first call: mapping never does, only whole-atlas views (report, explain)."""
        if self._vectors is None:
            self._vectors = fixed_size_rows(self._read_column("vector"))
        return self._vectors

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            classes, codes = self.label_codes()
            self._labels = classes.astype(object)[codes]
        return self._labels

    @property
    def has_broad(self) -> bool:
        """Whether the atlas has a second, coarser level of labels (`--broad-label-key`)."""
        return self._broad_labels is not None or self._broad_codes is not None

    @property
    def broad_labels(self) -> np.ndarray | None:
        """Each reference cell's broad label (None without a second level). A disk atlas
        keeps only the codes and builds this on the first call, as it does `labels`."""
        if self._broad_labels is None and self._broad_codes is not None:
            classes, codes, _ = self._broad_codes
            self._broad_labels = classes.astype(object)[codes]
        return self._broad_labels

    @property
    def cell_ids(self) -> np.ndarray:
        if self._cell_ids is None:
            self._cell_ids = string_values(self._read_column("cell_id"))
        return self._cell_ids

    @property
    def batches(self) -> np.ndarray:
        if self._batches is None:
            self._batches = string_values(self._read_column("batch"))
        return self._batches

    def dataset(self):
        """The atlas table (a `lance.LanceDataset`) at the version this atlas was opened at:
        what is read later (vectors, top genes, the disk index) belongs to the
        same rows as the labels read on opening, even after the atlas is rebuilt."""
        if self._ds is None:  # Atlas.from_fit: never written
            raise CellvecError(
                f"Atlas {self.name!r} is held in memory only (Atlas.from_fit) and has no table; "
                "open a stored atlas with Atlas.open to read one."
            )
        return self._ds

    def _read_column(self, name: str):
        if self.on_disk:
            log.info(
                "Reading column %s of disk atlas %s (%s cells) into memory",
                name,
                self.name,
                f"{self.n_cells:,}",
            )
        return self.dataset().to_table(columns=[name]).column(name)

    @property
    def k(self) -> int:
        """Neighbours in the vote: chosen by `atlas build --tune`, else 15."""
        return _k_of(self.meta)

    @property
    def classes(self) -> np.ndarray:
        return self.label_codes()[0]

    def label_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted class names, each cell's class index), computed once per loaded atlas."""
        if self._codes is None:
            self._codes = np.unique(self.labels.astype(str), return_inverse=True)
        return self._codes

    def broad_codes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sorted broad class names, each cell's broad class index, each fine class's broad
        class index or -1 where its cells carry several). Needs an atlas with broad labels."""
        if self._broad_codes is None:
            broad, codes = np.unique(self.broad_labels.astype(str), return_inverse=True)
            parent = class_parents(self.label_codes()[1], len(self.classes), codes, len(broad))
            self._broad_codes = (broad, codes, parent)
        return self._broad_codes

    def broad_calibration(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The typicality calibration of the broad level (as `calibration` is of the fine
        one), over the whole atlas or re-aggregated over the genes at `positions`."""

        def calibrate():
            vecs, index = (
                (_StoredVectors(self) if self.on_disk else self.vectors, self.index())
                if positions is None
                else self.vectors_over(positions)[:2]
            )
            return self_similarity(vecs, self.broad_codes()[1], index, self.held_out())

        return remember(self._broad, panel_key(positions), calibrate)

    def shifted_views(self, rows: np.ndarray, positions: np.ndarray | None, sigma: float):
        """A function of a random generator giving the refined vectors of the reference
        cells at `rows` (sorted), over the atlas genes at `positions` (all when None), with
        each gene's weight in each cell multiplied by a log-normal factor (`sigma`), as
        another species moves a gene's level: the views a query of another species'
        typicality is calibrated on (`calibration.species_calibrations`)."""
        w, encoder = self._weights_of(rows), self.encoder()
        return lambda rng: apply_head(
            encoder.refinement,
            reaggregate(
                encoder, augment_weights(w, rng, dropout=(0.0, 0.0), noise=sigma), positions
            ),
        )

    @classmethod
    def open(
        cls,
        store: str | Path | StoreLocation,
        name: str | None = None,
        *,
        encoder: CellEncoder | None = None,
        index=None,
    ) -> Atlas:
        """Atlas `name` of `store`; or, with no name, the atlas of the bundle `store` (a
        local folder, https://... or s3://..., fetched once into the cache and verified:
        `cellvec.fetch`).

        `encoder` and `index`: the atlas's encoder and in-memory search index when the
        caller already holds them (the build that wrote it, a service), so that they are
        not loaded or built again; `index` is ignored for a disk atlas."""
        if name is None:
            store, name = resolve_atlas(None, str(store))
        store = store_location(store)
        ds, meta = stored_atlas(store, name)
        found = meta.get("recipe", {}).get("version")
        if found != RECIPE_VERSION:
            raise StoreError(
                f"Atlas {name!r} in {store} was built by an older cellvec (recipe version "
                f"{found}, this one reads {RECIPE_VERSION}). Rebuild it with `cellvec atlas build`."
            )
        if (meta.get("index") or {}).get("kind") == "disk":
            return cls._open_disk(store, name, meta, ds, encoder)
        columns = ["cell_id", "label", "batch", "vector", "self_similarity"]
        has_broad = "label_broad" in ds.schema.names
        arrow = ds.to_table(columns=columns + (["label_broad"] if has_broad else []))
        return cls(
            name=name,
            store=store,
            meta=meta,
            _cell_ids=string_values(arrow.column("cell_id")),
            _labels=string_values(arrow.column("label")),
            _batches=string_values(arrow.column("batch")),
            _vectors=fixed_size_rows(arrow.column("vector")),
            version=ds.version,
            _ds=ds,
            _broad_labels=(string_values(arrow.column("label_broad")) if has_broad else None),
            _calibration=arrow.column("self_similarity").to_numpy(zero_copy_only=False),
            _encoder=encoder,
            _index=index,
        )

    @classmethod
    def _open_disk(cls, store, name: str, meta: dict, ds, encoder: CellEncoder | None) -> Atlas:
        """A disk atlas: label codes (int32) and calibration (float32) read in batches, so
        opening 20M cells holds ~160 MB, never the vectors or the cell ids."""
        n = ds.count_rows()
        classes = np.asarray(sorted(meta.get("classes") or {}), dtype=object)
        value_set = pa.array(classes.tolist(), pa.string())
        codes = np.empty(n, dtype=np.int32)
        calibration = np.empty(n, dtype=np.float32)
        has_broad = "label_broad" in ds.schema.names
        broad_classes = np.asarray(sorted(meta.get("broad_classes") or {}), dtype=object)
        broad_set = pa.array(broad_classes.tolist(), pa.string())
        broad = np.empty(n if has_broad else 0, dtype=np.int32)

        def codes_of(column, value_set):
            found = pc.index_in(column, value_set=value_set)
            if found.null_count:
                raise StoreError(
                    f"Atlas {name!r} in {store} has labels its metadata does not list; "
                    "rebuild it with `cellvec atlas build`."
                )
            return found.to_numpy(zero_copy_only=False)

        at = 0
        columns = ["label", "self_similarity"] + (["label_broad"] if has_broad else [])
        for batch in ds.to_batches(columns=columns, batch_size=1 << 20):
            m = batch.num_rows
            codes[at : at + m] = codes_of(batch.column(0), value_set)
            calibration[at : at + m] = batch.column(1).to_numpy(zero_copy_only=False)
            if has_broad:
                broad[at : at + m] = codes_of(batch.column(2), broad_set)
            at += m
        return cls(
            name=name,
            store=store,
            meta=meta,
            version=ds.version,
            _ds=ds,
            _codes=(classes, codes),
            _calibration=calibration,
            _encoder=encoder,
            _broad_codes=(
                (
                    broad_classes,
                    broad,
                    class_parents(codes, len(classes), broad, len(broad_classes)),
                )
                if has_broad
                else None
            ),
        )

    @classmethod
    def from_fit(
        cls,
        name: str,
        fit: FittedReference,
        labels,
        cell_ids=None,
        broad_labels=None,
        readout: str = "knn",
    ) -> Atlas:
        """An atlas held in memory only (evaluation folds): the same search and mapping as a
        stored one, without writing it."""
        n = len(fit.vectors)
        ids = cell_ids if cell_ids is not None else [str(i) for i in range(n)]
        return cls(
            name=name,
            store="",
            meta={"recipe": fit.encoder.recipe.to_dict(), "readout": readout},
            _cell_ids=np.asarray(ids, dtype=object),
            _labels=np.asarray(labels, dtype=object),
            _batches=np.full(n, "", dtype=object),
            _vectors=fit.vectors,
            _broad_labels=None if broad_labels is None else np.asarray(broad_labels, dtype=object),
            _encoder=fit.encoder,
            _weights=fit.weights,
            _held_out=fit.held_out,
        )

    def with_encoder(self, encoder: CellEncoder) -> Atlas:
        """This atlas using `encoder`, already loaded elsewhere (the service's), instead of
        loading its own."""
        self._encoder = encoder
        return self

    def encoder(self, gene_store: GeneStore | None = None) -> CellEncoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.store, self.name, self.recipe, gene_store)
        return self._encoder

    def cross_species(self) -> Atlas | None:
        """The atlas's cross-species view: the same reference cells under the recipe that
        maps another species (`build.SPECIES_VIEW`), written with it as an atlas table of
        its own; what a query mapped through orthologs is compared with. None for an atlas
        built without one (`--no-cross-species`, an older cellvec), or when the view in the
        store is not the one written with this atlas (another build's: a rebuild under way):
        a warning says so, and the atlas itself answers."""
        if self._cross:
            return self._cross[0]
        view = None
        if self.meta.get("cross_species") and self.store:
            try:
                view = Atlas.open(self.store, species_view_name(self.name))
            except StoreError:
                view = None
            if not is_its_view(self.name, self.meta, view and view.meta, self.store):
                view = None
            else:  # the view's head over the gene table this atlas has loaded already
                genes = self._encoder.genes if self._encoder is not None else None
                view._encoder = load_encoder(view.store, view.name, view.recipe, genes=genes)
        self._cross[:] = [view]
        return view

    def with_cross_species(self, view: Atlas | None) -> Atlas:
        """This atlas with `view` (None: none) as its cross-species view: for an atlas held
        in memory (`evaluate`'s folds), the view fitted beside it."""
        self._cross[:] = [view]
        return self

    def weights(self) -> sp.csr_matrix:
        """The reference cells' top-gene weights (cells x the atlas's genes), read once."""
        if self._weights is None:
            t = self.dataset().to_table(columns=["top_genes", "top_weights"])
            self._weights = weight_matrix(t, len(self.encoder().refinement["gene_rows"]))
        return self._weights

    def held_out(self) -> np.ndarray:
        """The calibration cells: held out of refinement (`--calibration-split`), at most
        `calibration.CALIBRATION_PER_CLASS` a class; re-aggregated panels are calibrated on the same."""
        if self._held_out is None:
            cal = self.calibration()
            self._held_out = np.isfinite(cal)
        return self._held_out

    def calibration(self) -> np.ndarray:
        """Per reference cell, the typicality calibration value (`self_similarity`), NaN
        for cells that are not calibration cells."""
        if self._calibration is None:
            held = self._held_out if self._held_out is not None else np.zeros(self.n_cells, bool)
            self._calibration = self_similarity(
                self.vectors, self.label_codes()[1], self.index(), held
            )
        return self._calibration

    def require_calibration(self) -> None:
        if not np.isfinite(self.calibration()).any():
            raise CellvecError(
                f"Atlas {self.name!r} has no held-out calibration cells, so typicality would "
                "be judged against cells refinement trained on (far too tight: most new cells "
                "would look atypical). Rebuild it with `cellvec atlas build ... "
                "--calibration-split 0.1` to use --min-typicality."
            )

    def coverage(self, positions: np.ndarray | None) -> float:
        """The share of the reference's top-gene weight on the atlas genes at `positions`
        (the genes a query measures, each once: a `GeneBasis`'s positions): 1.0 when the
        query has every gene that counts."""
        if positions is None:
            return 1.0
        return weight_share(
            self.weights() if self._panel_fits() else self._weights_sample(), positions
        )

    def _panel_fits(self) -> bool:
        """Whether re-aggregating the whole reference over a panel's genes fits the memory
        budget: always for an atlas searched in memory, for a disk atlas when its top-gene
        weights (~12 bytes a gene a cell) and a second set of vectors would."""
        if not self.on_disk:
            return True
        return fits_in_memory(self.n_cells, self.dimension, self.recipe.top_genes)

    def _weights_sample(self, n: int = 50_000) -> sp.csr_matrix:
        """Top-gene weights of `n` evenly spaced reference cells (a disk atlas's coverage)."""
        return self._weights_of(even_rows(self.n_cells, n))

    def _weights_of(self, rows: np.ndarray) -> sp.csr_matrix:
        """Top-gene weights of the reference cells at `rows` (sorted); a disk atlas reads only those."""
        if self._weights is not None or not self.on_disk:
            return sp.csr_matrix(self.weights()[rows])
        t = self.dataset().take(rows, columns=["top_genes", "top_weights"])
        return weight_matrix(t, len(self.encoder().refinement["gene_rows"]))

    def unrefined_sample(
        self, positions: np.ndarray | None = None, n: int = 20_000, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(vectors before the head, class codes) of a uniform sample of `n` reference cells
        (all of them when fewer), over the atlas genes at `positions` (all when None): the
        atlas side of the mixing test (`cell_index.mixing`)."""
        rows = sample_rows(self.n_cells, n, seed)
        vectors = reaggregate(self.encoder(), self._weights_of(rows), positions)
        return vectors, self.label_codes()[1][rows]

    def vectors_over(self, positions: np.ndarray) -> tuple[np.ndarray, object, np.ndarray]:
        """Reference vectors re-aggregated over the atlas genes at `positions` only, with
        the stored gene adapter, centre and head (nothing retrained), and their index.

        A query that measures fewer genes (a targeted or spatial panel, a dataset that
        kept its variable genes) is then compared with reference cells described by the
        same genes. Returns (vectors, index, typicality calibration), cached for the last
        few panels."""
        return remember(self._panels, panel_key(positions), lambda: self._panel(positions))

    def _panel(self, positions: np.ndarray) -> tuple[np.ndarray, object, np.ndarray]:
        if not self._panel_fits():
            # A prebuilt index holds full-panel vectors; labels from it would rest on genes
            # the query does not measure, so refuse rather than answer differently.
            raise CellvecError(
                f"Atlas {self.name!r} is searched on disk ({self.n_cells:,} cells) and the "
                f"query measures {len(positions):,} of its "
                f"{len(self.encoder().refinement['gene_rows']):,} genes: comparing it needs "
                "the reference re-aggregated over those genes, more than the memory budget "
                "(CELLVEC_ATLAS_MEMORY_BUDGET) allows. Build an atlas of the reference "
                "restricted to the query's genes (`cellvec atlas build` on the reference "
                "with only those genes), or map a query that measures the atlas's genes."
            )
        enc = self.encoder()
        vecs = apply_head(enc.refinement, reaggregate(enc, self.weights(), positions))
        index = build_index(vecs)
        held = self.held_out()
        return vecs, index, self_similarity(vecs, self.label_codes()[1], index, held)

    def index(self):
        """The search index over the atlas vectors (exact, or IVF above 200k cells), built
        once; for a disk atlas, the Lance index of its table (`disk_index.DiskIndex`)."""
        if self._index is None and self.on_disk:
            self._index = DiskIndex(self.dataset(), DiskIndexParams.from_dict(self.meta["index"]))
        if self._index is None:
            t = time.perf_counter()
            self._index = build_index(self.vectors)
            log.debug(
                "%s index over %s atlas cells in %.1f s",
                type(self._index).__name__,
                f"{len(self.vectors):,}",
                time.perf_counter() - t,
            )
        return self._index

    @classmethod
    def describe(cls, store: str | Path | StoreLocation, name: str) -> dict:
        """`summary()` of a stored atlas from its metadata and row count alone (`atlas
        list`): no labels, vectors or weights are read."""
        ds, meta = stored_atlas(store, name)
        return atlas_summary(name, meta, ds.count_rows())

    def summary(self) -> dict:
        return atlas_summary(self.name, self.meta, self.n_cells)


def readout_of(meta: dict) -> str:
    """How the atlas's calls are read off: `knn` (the neighbours' vote, the default) or
    `centroid` (the class centroids), chosen at build (`tune.choose_readout`). An atlas
    that names another (a newer cellvec's, or a hand-edited bundle) is refused rather
    than read some other way."""
    readout = meta.get("readout") or "knn"
    if readout not in READOUTS:
        raise CellvecError(
            f"The atlas is read by {readout!r}, which this cellvec does not know (it knows "
            f"{', '.join(READOUTS)}): upgrade cellvec, or rebuild the atlas with "
            "`cellvec atlas build --readout`."
        )
    return readout


def _k_of(meta: dict) -> int:
    """The atlas's neighbours in the vote: chosen by `atlas build --tune`, else 15."""
    return int(meta.get("k") or DEFAULT_K)


def atlas_summary(name: str, meta: dict, n_cells: int) -> dict:
    """What `atlas list` and the service say of an atlas: its size, labels and recipe."""
    return {
        "name": name,
        "n_cells": n_cells,
        "index": meta.get("index") or {"kind": "memory"},
        "label_key": meta.get("label_key"),
        "classes": meta.get("classes"),
        "broad_label_key": meta.get("broad_label_key"),
        "broad_classes": meta.get("broad_classes"),
        "recipe": meta.get("recipe"),
        "created": meta.get("created"),
        "source": meta.get("source"),
        "k": _k_of(meta),
        "readout": meta.get("readout") or "knn",  # listed as written; mapping checks it
        "readout_scores": meta.get("readout_scores"),
        "tuning": meta.get("tuning"),
        "excluded_labels": meta.get("excluded_labels"),
        "refinement": {k: v for k, v in (meta.get("refinement") or {}).items() if k != "history"},
        # the pre-trained prior its refinement started from (`atlas build --prior`), or None
        "prior": ((meta.get("refinement") or {}).get("prior") or {}).get("name"),
        # what `map --orthologs` compares another species with (None: the atlas itself)
        "cross_species": meta.get("cross_species"),
    }
