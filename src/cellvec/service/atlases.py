"""Atlases as the service holds them: a search index and label codes memory-mapped from files.

The first process to serve an atlas version writes its search index (faiss format)
and label codes to `<cache_dir>/<atlas>/v<version>-<hash>/`, in a temporary folder
renamed into place under a file lock; every process (each `--workers` process)
then maps those files into memory, so the operating system keeps one copy of the
atlas vectors however many workers serve them. Folders of older versions are
removed when a newer one is written. Where there is no cache folder (a store in a
bucket served without `cache_dir`) or it cannot be written (a warning says so), the
atlas is held in memory; a disk atlas is searched through its table's Lance index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellvec.cell_index.atlas import Atlas, atlas_summary
from cellvec.cell_index.calls import LabelCodes, Target
from cellvec.cell_index.encoder import load_encoder
from cellvec.cell_index.mapping import Reference
from cellvec.cell_index.recipe import Recipe
from cellvec.storage import StoreLocation, read_meta

log = logging.getLogger(__name__)


@dataclass
class ServedAtlas:
    """An atlas as the service holds it: the `Reference` mapping calls (encoder, label codes,
    search index over memory-mapped files), the version it was read at, and where from."""

    name: str
    version: int
    reference: Reference
    store: StoreLocation | None = None  # where the atlas is read from
    folder: Path | None = None  # the memory-mapped files, if any

    @property
    def meta(self) -> dict:
        return self.reference.meta

    @property
    def n_cells(self) -> int:
        return self.reference.labels.n_cells

    def summary(self) -> dict:
        """What `cellvec atlas list` says of the atlas (`GET /v1/atlases`)."""
        return atlas_summary(self.name, self.meta, self.n_cells)


def _key(version: int, meta: dict) -> str:
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    return f"v{version}-{digest}"


class AtlasCache:
    """Loaded atlases by name; a newer committed table version is picked up within
    `version_check_s` seconds, and a request never sees a half-written atlas."""

    def __init__(
        self,
        store: StoreLocation,
        gene_store,
        cache_dir: str | Path | None,
        version_check_s=1.0,
        *,
        freeze_heap: bool = False,
    ):
        """`freeze_heap`: for a server process, keep what it holds once atlases are loaded
        out of the garbage collector's full passes (`settle_heap`)."""
        self.store = store
        self.gene_store = gene_store
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.version_check_s = version_check_s
        self.freeze_heap = freeze_heap
        self.lock = threading.Lock()
        self.atlases: dict[str, tuple[float, ServedAtlas]] = {}
        self.checking: set[str] = set()

    def fresh(self, name: str) -> ServedAtlas | None:
        """The loaded atlas if its version was checked less than `version_check_s` ago."""
        cached = self.atlases.get(name)
        if cached and time.monotonic() - cached[0] < self.version_check_s:
            return cached[1]
        return None

    def current(self, name: str) -> ServedAtlas | None:
        """The loaded atlas without waiting (None if not loaded). When its version was last
        checked `version_check_s` ago or more, one background thread checks it (and loads a
        newer version) while requests go on being answered from the loaded one; a check
        on the request path made every request wait on the table once a second."""
        cached = self.atlases.get(name)
        if cached is None:
            return None
        if time.monotonic() - cached[0] >= self.version_check_s and name not in self.checking:
            self.checking.add(name)
            threading.Thread(target=self._check, args=(name,), daemon=True).start()
        return cached[1]

    def _check(self, name: str) -> None:
        try:
            self.get(name)
        except KeyError:  # the atlas was dropped
            self.atlases.pop(name, None)
        except Exception:  # noqa: BLE001 (keep serving the loaded version)
            log.exception("Checking atlas %s for a newer version failed", name)
        finally:
            self.checking.discard(name)

    def preload(self) -> None:
        """Load every atlas of the store (at startup, so no request waits for it)."""
        from cellvec.cell_index.table import list_atlases

        for name in list_atlases(self.store):
            try:
                self.get(name)
            except Exception:  # noqa: BLE001 (a request will report it)
                log.exception("Preloading atlas %s failed", name)
        self.settle_heap()

    def settle_heap(self) -> None:
        """With `freeze_heap`: collect, then freeze what is left (`gc.freeze`). A full
        collection walked the ~200,000 objects of a loaded worker (modules, atlases) in
        250-420 ms, every few seconds under load, stalling every request in flight (the
        p99 of one worker); frozen, they are not walked again. Unfrozen first, so that an
        atlas version replaced since is collected rather than kept for good."""
        if not self.freeze_heap:
            return
        import gc

        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def get(self, name: str) -> ServedAtlas:
        """The atlas `name`, loaded or reloaded as needed; KeyError if there is none."""
        from cellvec.cell_index.table import ATLAS_PREFIX, is_atlas_name

        if not is_atlas_name(name):  # no store look-up for a name no atlas can have
            raise KeyError(name)
        hit = self.fresh(name)
        if hit is not None:
            return hit
        now = time.monotonic()
        tbl = self.gene_store.store.open_table(ATLAS_PREFIX + name)
        if tbl is None:
            raise KeyError(name)
        with self.lock:
            cached = self.atlases.get(name)
            if cached and cached[1].version == tbl.version:
                self.atlases[name] = (now, cached[1])
                return cached[1]
            atlas = self._load(name, tbl)
            replaced = cached is not None
            self.atlases[name] = (now, atlas)
            log.info(
                "Loaded atlas %s (version %d, %s cells%s)",
                name,
                atlas.version,
                f"{atlas.n_cells:,}",
                f", memory-mapped from {atlas.folder}" if atlas.folder else "",
            )
        if replaced:
            del cached
            self.settle_heap()  # the old version goes (preload settles the first ones)
        return atlas

    def _load(self, name: str, tbl) -> ServedAtlas:
        from cellvec.cell_index.knn import read_index

        meta = read_meta(tbl)
        # A disk atlas is searched through its table's Lance index, whose files the OS page
        # cache already shares between workers: only its label codes are held per worker.
        disk = (meta.get("index") or {}).get("kind") == "disk"
        if self.cache_dir is not None and meta.get("complete") and not disk:
            folder = self.cache_dir / name / _key(tbl.version, meta)
            if not (folder / "index.faiss").exists():
                folder = self._write(name)
            if folder is not None:
                with open(folder / "atlas.json") as fh:
                    info = json.load(fh)
                labels = LabelCodes(
                    np.asarray(info["classes"], dtype=object),
                    np.load(folder / "codes.npy", mmap_mode="r"),
                    **_broad_codes(folder, info),
                )
                broad = (
                    np.load(folder / "broad_calibration.npy", mmap_mode="r")
                    if labels.has_broad
                    else None
                )
                whole = Target(
                    read_index(folder / "index.faiss"),
                    np.load(folder / "calibration.npy", mmap_mode="r"),
                    broad,
                )
                meta = info["meta"]
                encoder = load_encoder(
                    self.store, name, Recipe.from_dict(meta["recipe"]), self.gene_store
                )
                return self._served(name, info["version"], meta, encoder, labels, whole, folder)
        atlas = Atlas.open(self.store, name)
        reference = Reference.of(atlas.with_encoder(atlas.encoder(self.gene_store)))
        return ServedAtlas(name, atlas.version, reference, self.store)

    def _view(self, name: str, meta: dict):
        """A callable giving the `Reference` of atlas `name`'s cross-species view, loaded
        as the atlas is (memory-mapped where it can be) on the first query through
        orthologs; None for an atlas without one."""
        from cellvec.cell_index.table import ATLAS_PREFIX, is_its_view, species_view_name
        from cellvec.storage import read_meta

        if not meta.get("cross_species"):
            return None

        def view():
            tbl = self.gene_store.store.open_table(ATLAS_PREFIX + species_view_name(name))
            view_meta = read_meta(tbl) if tbl is not None else None
            if not is_its_view(name, meta, view_meta, self.store):
                return None
            return self._load(species_view_name(name), tbl).reference.view_of(name, meta)

        return view

    def _served(self, name, version, meta, encoder, labels, whole, folder) -> ServedAtlas:
        """An atlas served from memory-mapped files; the whole `Atlas` (its reference weights,
        for panels and the mixing test) is opened on the first request that needs it."""
        opened = []

        def full():
            if not opened:
                opened.append(Atlas.open(self.store, name).with_encoder(encoder))
            return opened[0]

        reference = Reference(
            name, meta, encoder, labels, full, whole, cross=self._view(name, meta)
        )
        return ServedAtlas(name, version, reference, self.store, folder)

    def _write(self, name: str) -> Path | None:
        """Write the files of the atlas's current version (once, whichever process comes
        first); None when the cache folder cannot be written."""
        import fcntl

        from cellvec.cell_index.knn import build_index, write_index

        base = self.cache_dir / name
        try:
            base.mkdir(parents=True, exist_ok=True)
            lock = open(base / ".lock", "w")  # noqa: SIM115 (held across the write)
        except OSError as e:
            log.warning("Cannot write the atlas cache in %s (%s); atlases stay in memory", base, e)
            self.cache_dir = None
            return None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            atlas = Atlas.open(self.store, name)
            folder = base / _key(atlas.version, atlas.meta)
            if not (folder / "index.faiss").exists():
                t = time.perf_counter()
                tmp = base / f".{folder.name}.{os.getpid()}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                classes, codes = atlas.label_codes()
                np.save(tmp / "codes.npy", codes.astype(np.int32))
                np.save(tmp / "calibration.npy", atlas.calibration().astype(np.float32))
                write_index(build_index(atlas.vectors), tmp / "index.faiss")
                broad = _broad_level(atlas)
                for k in ("codes", "parent", "calibration") if broad else ():
                    np.save(tmp / f"broad_{k}.npy", broad[k])
                (tmp / "atlas.json").write_text(
                    json.dumps(
                        {
                            "version": atlas.version,
                            "meta": atlas.meta,
                            "classes": classes.astype(str).tolist(),
                            "broad_classes": broad["classes"].astype(str).tolist()
                            if broad
                            else None,
                        }
                    )
                )
                os.replace(tmp, folder)
                log.info(
                    "Atlas %s version %d written for memory-mapping to %s in %.1f s",
                    name,
                    atlas.version,
                    folder,
                    time.perf_counter() - t,
                )
            for old in base.glob("v*-*"):  # older versions; a process still mapping them keeps
                if old != folder and _version(old.name) < atlas.version:  # its pages until it
                    shutil.rmtree(old, ignore_errors=True)  # moves on
        return folder


def _broad_level(atlas) -> dict | None:
    """The broad level of an `Atlas` as the service writes it (None without one)."""
    if not atlas.has_broad:
        return None
    classes, codes, parent = atlas.broad_codes()
    return {
        "classes": classes.astype(object),
        "codes": codes.astype(np.int32),
        "parent": parent.astype(np.int64),
        "calibration": atlas.broad_calibration().astype(np.float32),
    }


def _broad_codes(folder: Path, info: dict) -> dict:
    """`LabelCodes`'s broad fields from the files `_write` wrote (none without a broad level)."""
    if info.get("broad_classes") is None:
        return {}
    return dict(
        broad_classes=np.asarray(info["broad_classes"], dtype=object),
        broad_codes=np.load(folder / "broad_codes.npy", mmap_mode="r"),
        parent=np.load(folder / "broad_parent.npy", mmap_mode="r"),
        broad_key=info["meta"].get("broad_label_key"),
    )


def _version(folder_name: str) -> int:
    try:
        return int(folder_name[1:].split("-", 1)[0])
    except ValueError:
        return -1
