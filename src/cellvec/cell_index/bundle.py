"""Atlas bundles: one folder another lab maps onto, with no gene store to build.

`export_bundle` writes a folder that is itself a small LanceDB store, so mapping onto a
bundle is mapping onto that store and nothing in the mapping path changes:

- `atlas_<name>.lance`: the atlas table as it is (latest version only), its metadata
  gaining the card;
- `_artifact_<digest>.lance`: the background transform and the refinement (gene rows,
  gene adapter, centre, head) the recipe names, under the same digests;
- `genes_<model>.lance`: the gene table the atlas was built on, every row kept with its
  names (symbol, synonyms, Ensembl id), so a query's genes match exactly as they match
  in the original store (the same ambiguities, the same share matched), but vectors only
  for the genes the atlas uses (the reference's matched genes, `gene_rows`); the others
  carry an empty vector and are never used, since a query gene outside the atlas's
  genes carries no weight. Rows keep their order, so the artifacts' `gene_rows` hold
  as they are, and the table's metadata keeps the original `content_hash`: the recipe's
  `gene_table_hash` names the table the vectors come from, and the check in
  `load_encoder` passes by construction (`restricted` in its metadata says what was
  left out);
- `card.json` (`atlas_card`) and `manifest.json` (sizes and sha256 of every file,
  `cellvec.fetch`).

`import_bundle` copies a bundle's atlas into a store whose gene table for that model
matches it in the genes the atlas uses (rows re-pointed when the table differs only
elsewhere); `fetch.fetch_bundle` brings a bundle from a URL into the cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cellvec import __version__
from cellvec.cell_index.artifacts import array_hash, load_artifact, save_artifact
from cellvec.cell_index.build import index_atlas, index_meta
from cellvec.cell_index.disk_index import MIN_DISK_CELLS
from cellvec.cell_index.recipe import MAX_K, Recipe, is_count
from cellvec.cell_index.table import (
    ATLAS_PREFIX,
    drop_view_of_old_build,
    is_atlas_name,
    is_its_view,
    species_view_name,
    stored_atlas,
)
from cellvec.errors import CellvecError, StoreError
from cellvec.fetch import CARD, MANIFEST, REFETCH, fetch_bundle, write_manifest
from cellvec.gene_store.store import GeneStore
from cellvec.gene_store.tables import GENE_COLUMNS, table_name
from cellvec.storage import META_KEY, Store, StoreLocation, read_meta, replace_table

log = logging.getLogger(__name__)

CARD_FIELDS = ("species", "tissue", "source", "citation", "licence")
MAX_REFINE = 100  # an imported disk index's refine factor (candidates re-ranked, times k)


@dataclass
class ExportResult:
    """What `export_bundle` wrote: the folder, its size, files and manifest digest."""

    path: str
    atlas: str
    bytes: int
    files: int
    manifest_sha256: str
    seconds: float
    card: dict

    def to_dict(self) -> dict:
        return asdict(self)


def atlas_card(store, name: str, *, extra: dict | None = None) -> dict:
    """What an atlas is: species, tissue, source, citation and licence (from `extra` or
    what export recorded), cells, genes, classes with counts, recipe and model, the
    cellvec version, and its cross-validated scores when they were computed."""
    store = Store.of(store)
    ds, meta = stored_atlas(store, name)
    recipe = Recipe.from_dict(meta["recipe"])
    head = load_artifact(store, recipe.head_hash) if recipe.head_hash else {}
    return _card(store, name, ds, meta, head, extra=extra)


def _card(store: Store, name: str, ds, meta: dict, head: dict, *, extra: dict | None) -> dict:
    """`atlas_card` from what the caller has read already: the atlas table and metadata,
    and its refinement artifact (`head`)."""
    recipe = Recipe.from_dict(meta["recipe"])
    gene_meta = read_meta(store.open_table(table_name(recipe.model)) or pa.table({}))
    given = {k: v for k, v in (meta.get("card") or {}).items() if v is not None}
    given.update({k: v for k, v in (extra or {}).items() if v is not None})
    classes = meta.get("classes") or {}
    card = {
        "atlas": name,
        "species": given.get("species") or gene_meta.get("species"),
        "tissue": given.get("tissue"),
        "source": given.get("source") or meta.get("source"),
        "citation": given.get("citation"),
        "licence": given.get("licence"),
        "n_cells": ds.count_rows(),
        "n_genes": int(len(head["gene_rows"])) if "gene_rows" in head else None,
        "n_classes": len(classes),
        "classes": classes,
        "label_key": meta.get("label_key"),
        "broad_classes": meta.get("broad_classes"),
        "model": recipe.model,
        "recipe": meta["recipe"],
        "k": int(meta.get("k") or 15),
        "created": meta.get("created"),
        "cellvec_version": given.get("cellvec_version") or __version__,
        "evaluation": given.get("evaluation"),
        "ontology": {
            c: v.get("id") for c, v in ((meta.get("ontology") or {}).get("labels") or {}).items()
        }
        or None,
    }
    return card


def card_rows(card: dict) -> tuple[list[tuple[str, str]], list[tuple[str, int, str, str]]]:
    """The card as rows, for `card_text` and the HTML report alike: (field, value) pairs,
    and per class, largest first, (name, cells, cross-validated F1 or '', Cell Ontology id,
    '-' when none was chosen, or '' when the atlas has no ids)."""
    r = card.get("recipe") or {}
    fields = [(key, str(card.get(key) or "-")) for key in CARD_FIELDS]
    genes = card.get("n_genes")
    fields += [
        ("cells", f"{card['n_cells']:,}"),
        ("genes", f"{genes:,}" if isinstance(genes, int) else "-"),
        (
            "recipe",
            f"{r.get('model')} top{r.get('top_genes')} {r.get('weighting')} "
            f"bg={r.get('background')} refine={r.get('refine')} k={card.get('k')}",
        ),
        ("cellvec", str(card.get("cellvec_version") or "-")),
    ]
    ev = card.get("evaluation") or {}
    if ev:
        fields.append(
            (
                "scores",
                f"macro-F1 {ev['macro_f1']:.3f}, accuracy {ev['accuracy']:.3f} "
                f"({ev['folds']}-fold cross-validation on the reference)",
            )
        )
    per = ev.get("per_class_f1") or {}
    onto = card.get("ontology") or {}
    classes = [
        (c, n, f"{per[c]:.3f}" if c in per else "", (onto.get(c) or "-") if onto else "")
        for c, n in sorted((card.get("classes") or {}).items(), key=lambda kv: -kv[1])
    ]
    return fields, classes


def card_text(card: dict) -> str:
    """The card as plain text (`cellvec atlas card`)."""
    fields, classes = card_rows(card)
    lines = [f"atlas {card['atlas']}"] + [f"  {k + ':':<12}{v}" for k, v in fields]
    lines.append(f"  classes ({len(classes)}):")
    scored = any(f1 for _, _, f1, _ in classes)
    for c, n, f1, cl in classes:
        f1 = (f"   F1 {f1}" if f1 else " " * 11) if scored else ""
        lines.append(f"    {c:<30}{n:>8,}{f1}{f'   {cl}' if cl else ''}")
    return "\n".join(lines)


def _restricted_genes(gs: GeneStore, model: str, rows: np.ndarray) -> pa.Table:
    """The gene table of `model` with every row's names but only `rows`' vectors (the
    store's table may itself be a bundle's restricted one: `GeneStore.load` reads both)."""
    genes = gs.load(model)
    types = gs.store.open_table(table_name(model)).schema
    n, dim = genes.vectors.shape
    keep = np.zeros(n, dtype=bool)
    keep[rows] = True
    offsets = np.zeros(n + 1, dtype=np.int32)
    offsets[1:] = np.cumsum(np.where(keep, dim, 0))
    vectors = pa.ListArray.from_arrays(pa.array(offsets), pa.array(genes.vectors[keep].ravel()))
    meta = {
        **genes.meta,
        "restricted": {
            "genes_with_vectors": int(keep.sum()),
            "n_genes": n,
            "why": "an atlas bundle: every gene's names (so queries match as in the full "
            "table) and the vectors of the atlas's genes only; content_hash names the full "
            "table those vectors come from",
        },
    }
    names = genes.genes.to_arrow()
    columns = {c: names.column(c).cast(types.field(c).type) for c in GENE_COLUMNS}
    columns["go_terms"] = pa.array([[]] * n, pa.list_(pa.string()))
    columns["text"] = pa.nulls(n, pa.string())
    columns["text_hash"] = pa.nulls(n, pa.string())
    columns["vector"] = vectors
    table = pa.table(columns)
    return table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def _write_genes(location: StoreLocation, model: str, table: pa.Table) -> None:
    """A restricted gene table, written by Lance itself (LanceDB refuses a `vector` column
    whose lists are not all one length, which is what a restricted table is) where the
    store has no table for `model`."""
    import lance

    lance.write_dataset(
        table,
        location.table_uri(table_name(model)),
        mode="create",
        storage_options=location.options() or None,
    )


def _check_settings(meta: dict, ds, source: str, what: str) -> None:
    """The settings of a bundle's atlas (or its view: `what`) that this store acts on:
    `k` (the vote's neighbours) and its index. The copy is indexed as this store chooses
    for its size (`_index_entry`), but a disk index must be possible for it."""
    k = meta.get("k")
    if k is not None and not is_count(k, MAX_K):
        raise StoreError(
            f"Bundle {source}: its {what}'s k is {str(k)[:40]!r}, not a number of neighbours "
            f"from 1 to {MAX_K}; the bundle was refused. {REFETCH}"
        )
    index = meta.get("index") or {}
    if not isinstance(index, dict) or index.get("kind", "memory") not in ("memory", "disk"):
        raise StoreError(
            f"Bundle {source}: its {what}'s index entry {str(index)[:80]!r} is not one "
            f"cellvec writes; the bundle was refused. {REFETCH}"
        )
    if index.get("kind") == "disk" and ds.count_rows() < MIN_DISK_CELLS:
        raise StoreError(
            f"Bundle {source}: its {what} names a disk index for {ds.count_rows():,} cells, "
            f"fewer than one needs ({MIN_DISK_CELLS:,}); the bundle was refused. {REFETCH}"
        )


def _copy_atlas(db, name: str, ds, meta: dict) -> dict:
    """The atlas table's latest version, streamed, with metadata `meta`, its index entry
    as this store gives it (`_index_entry`); returns the metadata written."""
    if (meta.get("index") or {}).get("kind") == "disk":
        meta = {**meta, "index": _index_entry(meta["index"], ds)}
    schema = ds.schema.with_metadata({META_KEY: json.dumps(meta).encode()})
    reader = pa.RecordBatchReader.from_batches(
        schema, (b.cast(schema) for b in ds.to_batches(batch_size=65_536))
    )
    replace_table(db, ATLAS_PREFIX + name, reader)
    return meta


def _index_entry(index: dict, ds) -> dict:
    """A disk index entry for the copy of table `ds`: built as this store chooses for its
    size (`disk_index.choose_params`, as `atlas build` chose them), never with build
    parameters a bundle names (a `num_partitions` of a million ran k-means for hours),
    searched with the `nprobes` and `refine_factor` given (`atlas index --nprobes`) when
    they are within bounds. Until the index is built, readers search the table exactly."""
    entry = index_meta("disk", ds.count_rows(), ds.schema.field("vector").type.list_size)
    for key, most in (("nprobes", entry["num_partitions"]), ("refine_factor", MAX_REFINE)):
        value = index.get(key)
        if is_count(value, most):
            entry[key] = value
    return entry


def _view(store: Store, name: str, meta: dict) -> tuple | None:
    """(table, metadata) of atlas `name`'s cross-species view; None without one, or, with
    a warning, when the store holds another build's (`table.is_its_view`)."""
    if not meta.get("cross_species"):
        return None
    try:
        ds, view_meta = stored_atlas(store, species_view_name(name))
    except StoreError:
        ds = view_meta = None
    return (ds, view_meta) if is_its_view(name, meta, view_meta, store) else None


def _copy_view(
    target: Store, name: str, view: tuple | None, meta: dict, written: list | None = None
) -> dict:
    """Copy the cross-species `view` (`_view`) as atlas `name`'s, before the atlas; returns
    the atlas's metadata naming it (by the id the two share) or naming none, without a
    view. The view's table is added to `written` once it is."""
    cross = meta.get("cross_species")
    meta = {k: v for k, v in meta.items() if k != "cross_species"}
    if view is None:
        return meta
    view_name = species_view_name(name)
    ds, view_meta = view
    view_meta = _copy_atlas(target.db, view_name, ds, {**view_meta, "species_view_of": name})
    if written is not None:
        written.append(ATLAS_PREFIX + view_name)
    _reindex(target.location, view_name, view_meta)
    return {**meta, "cross_species": cross}


def _reindex(store: StoreLocation, name: str, written: dict) -> None:
    """An atlas (or view) whose copy was written with a disk index entry (`written`, what
    `_copy_atlas` returned) gets that index built (the table is copied row by row, its
    index is not); the atlas's view is not indexed again (`_copy_view` did)."""
    index = written.get("index") or {}
    if index.get("kind") == "disk":
        search = {k: index[k] for k in ("nprobes", "refine_factor")}
        index_atlas(store, name, index="disk", params=search, with_view=False)


def export_bundle(
    store: str | Path | StoreLocation,
    name: str,
    out: str | Path,
    *,
    card: dict | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write atlas `name` of `store` as a bundle folder `out` (see the module docstring).
    `card` adds species, tissue, source, citation, licence and `evaluation` to the card.
    The folder appears whole or not at all."""
    t0 = time.perf_counter()
    store = Store.of(store)
    out = Path(out)
    _check_out(out, overwrite)
    ds, meta = stored_atlas(store, name)
    view = _view(store, name, meta)
    recipe = Recipe.from_dict(meta["recipe"])
    arrays = {}
    for part in (meta, view[1]) if view else (meta,):
        r = Recipe.from_dict(part["recipe"])
        arrays.update({h: load_artifact(store, h) for h in (r.background_hash, r.head_hash) if h})
    head = arrays.get(recipe.head_hash) or {}
    if "gene_rows" not in head:
        raise CellvecError(
            f"Atlas {name!r} records no gene rows (no refinement artifact); rebuild it with "
            "`cellvec atlas build` before exporting."
        )
    rows = head["gene_rows"]
    if view:  # the view's genes are the reference's too; their vectors travel all the same
        rows = np.union1d(rows, arrays[Recipe.from_dict(view[1]["recipe"]).head_hash]["gene_rows"])
    card = _card(store, name, ds, meta, head, extra=card)
    folder = out.resolve()
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        target = Store(tmp, create=True)
        for digest, a in arrays.items():
            if save_artifact(target, a) != digest:
                raise StoreError(f"Artifact {digest} of atlas {name!r} changed on copying.")
        genes = _restricted_genes(GeneStore(store), recipe.model, rows)
        _write_genes(target.location, recipe.model, genes)
        meta = _copy_view(target, name, view, meta)
        _reindex(
            target.location,
            name,
            _copy_atlas(target.db, name, ds, {**meta, "card": _card_given(card)}),
        )
        _prune(tmp)
        (tmp / CARD).write_text(json.dumps(card, indent=1))
        manifest, digest = write_manifest(
            tmp, atlas=name, model=recipe.model, extra={"cellvec_version": __version__}
        )
        old = None
        if out.exists():
            _check_out(out, overwrite)  # still a bundle, a moment later
            # moved aside, not removed, until the new one is in place: interrupted
            # between the two renames, the old bundle is still whole beside it
            old = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.old"
            folder.rename(old)
        try:
            tmp.rename(folder)
        except BaseException:
            if old is not None:
                old.rename(folder)  # the old bundle back in its place
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f["bytes"] for f in manifest["files"].values())
    res = ExportResult(
        path=str(out),
        atlas=name,
        bytes=size + (out / MANIFEST).stat().st_size,
        files=len(manifest["files"]) + 1,
        manifest_sha256=digest,
        seconds=round(time.perf_counter() - t0, 2),
        card=card,
    )
    log.info(
        "Bundle %s: atlas %s, %s cells, %s genes with vectors, %.1f MiB, %d files, in %.1f s",
        out,
        name,
        f"{card['n_cells']:,}",
        f"{len(rows):,}",
        res.bytes / 2**20,
        res.files,
        res.seconds,
    )
    return res


def _check_out(out: Path, overwrite: bool) -> None:
    """`out` may be written: it does not exist, or it is a bundle (it has a manifest) and
    `overwrite` is given. `--overwrite` never empties a folder that is not a bundle (`--out
    .` would be the working directory), nor one that would hold the folder being written."""
    if not out.exists():
        return
    if not overwrite:
        raise CellvecError(f"{out} exists: choose another --out, or pass --overwrite.")
    folder = out.resolve()
    if not (folder / MANIFEST).is_file() or folder == folder.parent:
        raise CellvecError(
            f"{out} is not a bundle (it has no {MANIFEST}), so --overwrite will not replace "
            "it: choose a new --out, or remove the folder yourself."
        )


def _card_given(card: dict) -> dict:
    """What the atlas's metadata keeps of a card: what was given, not what it derives."""
    return {k: card.get(k) for k in (*CARD_FIELDS, "cellvec_version", "evaluation")}


def _prune(folder: Path) -> None:
    """Drop what LanceDB leaves besides the tables (empty staging folders)."""
    for p in folder.iterdir():
        if p.is_dir() and not p.name.endswith(".lance"):
            shutil.rmtree(p)


def import_bundle(
    ref: str | os.PathLike,
    store: str | Path | StoreLocation,
    *,
    name: str | None = None,
    replace: bool = False,
    storage_options: dict | None = None,
) -> dict:
    """Copy the atlas of bundle `ref` into `store` (as `name`, default its own).

    The store's gene table for the atlas's model must hold the atlas's genes with the
    same vectors: the same table (its content hash) is used as it is; a table that differs
    only in other genes gets the atlas's gene rows re-pointed at its own rows (the recipe
    then names that table); one that lacks or changes a gene the atlas uses is refused,
    naming the fix. A store with no table for the model gets the bundle's (every gene's
    names, the atlas's genes' vectors)."""
    bundle = fetch_bundle(ref, storage_options=storage_options)
    name = name or bundle.atlas
    if not is_atlas_name(name):
        raise CellvecError(f"Atlas name {name!r}: use letters, digits and underscores.")
    src = Store(bundle.path)
    ds, meta = stored_atlas(src, bundle.atlas)
    recipe = Recipe.from_dict(meta["recipe"])
    target = Store.of(store, create=True)
    if ATLAS_PREFIX + name in target.table_names() and not replace:
        raise CellvecError(
            f"Store {target.path} already has an atlas {name!r}: import as another --name, or "
            "pass --replace."
        )
    view = _view(src, bundle.atlas, meta)
    # every check before the first write: a refused import leaves the store as it was
    _check_settings(meta, ds, bundle.source, "atlas")
    if view is not None:
        _check_settings(view[1], view[0], bundle.source, "atlas's cross-species view")
    gene_table = target.open_table(table_name(recipe.model))
    ours = theirs = None
    how = "the bundle's gene table (the atlas's genes only; build the full one with `cellvec genes build`)"
    if gene_table is not None:
        ours = GeneStore(target).load(recipe.model)
        if ours.meta.get("content_hash") == recipe.gene_table_hash:
            how = "the same gene table"
        else:
            theirs = GeneStore(src).load(recipe.model)
    meta, arrays = _fitted(src, meta, ours, theirs, bundle.source, target.path)
    if view is not None:
        view_meta, view_arrays = _fitted(src, view[1], ours, theirs, bundle.source, target.path)
        view, arrays = (view[0], view_meta), arrays + view_arrays
    if theirs is not None:
        rows = len(arrays[0]["gene_rows"])  # the atlas's head, re-pointed
        how = f"the store's own gene table ({rows:,} atlas genes re-pointed at its rows)"
    had, written = set(target.table_names()), []
    try:
        if gene_table is None:
            _write_genes(
                target.location, recipe.model, src.open_table(table_name(recipe.model)).to_arrow()
            )
            written.append(table_name(recipe.model))
        for a in arrays:
            save_artifact(target, a)
        meta = _copy_view(target, name, view, meta, written)
        copied = _copy_atlas(target.db, name, ds, meta)
        written.append(ATLAS_PREFIX + name)
        if view is None:
            drop_view_of_old_build(target, name)
        _reindex(target.location, name, copied)
    except BaseException:
        # the tables this import created go (artifacts stay: content-addressed, used by
        # no atlas); one it replaced (--replace) is not brought back, and one another
        # writer made meanwhile is not this import's to drop
        for table in written:
            if table not in had:
                target.db.drop_table(table)
        raise
    log.info("Imported atlas %s from %s into %s, on %s", name, bundle.source, target.path, how)
    return {
        "atlas": name,
        "store": str(target.path),
        "source": bundle.source,
        "n_cells": int(ds.count_rows()),
        "gene_table": how,
    }


def _fitted(src: Store, meta: dict, ours, theirs, source: str, store: str) -> tuple[dict, list]:
    """An atlas's metadata and artifacts (head, background) as the target store will hold
    them: checked against the store's gene table `ours` (None: the store has none yet);
    re-pointed at its rows when that table differs from the bundle's (`theirs`)."""
    recipe = Recipe.from_dict(meta["recipe"])
    head = load_artifact(src, recipe.head_hash)
    bg = load_artifact(src, recipe.background_hash) if recipe.background_hash else None
    if ours is not None and theirs is None:
        _require_vectors(ours, head["gene_rows"], source, store)
    elif ours is not None:
        rows = _repoint(theirs, ours, head["gene_rows"], source, store)
        head = {**head, "gene_rows": rows}
        recipe = Recipe.from_dict(
            {
                **recipe.to_dict(),
                "gene_table_hash": ours.meta.get("content_hash"),
                "head_hash": array_hash(head),
            }
        )
        meta = {**meta, "recipe": recipe.to_dict()}
    return meta, [a for a in (head, bg) if a is not None]


def _require_vectors(ours, rows: np.ndarray, source: str, store: str) -> None:
    """The store's table is the one the atlas was built on, but it may itself have come
    from another bundle, with vectors for that bundle's atlas's genes only: refused
    unless every gene this atlas uses has one."""
    lacking = np.flatnonzero(~np.abs(ours.vectors[rows]).any(axis=1))
    if len(lacking):
        names = ours.genes["symbol"].to_list()
        example = ", ".join(str(names[rows[i]]) for i in lacking[:5])
        raise StoreError(
            f"Store {store}: its {ours.model} gene table came with another atlas bundle and "
            f"has no vectors for {len(lacking):,} of this atlas's {len(rows):,} genes (e.g. "
            f"{example}). Fix: build the full table there (`cellvec genes build --model "
            f"{ours.model} --store {store} ...`), import into another store (--store NEW_DIR), "
            f"or map straight from the bundle with `cellvec map QUERY --atlas {source}`."
        )


def _repoint(theirs, ours, rows: np.ndarray, source: str, store: str) -> np.ndarray:
    """The rows of `ours` holding the atlas's genes (`rows` of `theirs`), matched by gene id
    and symbol, refused unless every one is there with the same vector."""
    key = ["gene_id", "symbol"]
    want = theirs.genes[rows.tolist()].select(key).with_row_index("at")
    have = ours.genes.select(key).with_row_index("row")
    found = want.join(have, on=key, how="left").sort("at")
    found = found.unique("at", keep="first", maintain_order=True)
    at_rows = found["row"].fill_null(-1).to_numpy().astype(np.int64)
    missing = at_rows < 0
    same = np.zeros(len(rows), dtype=bool)
    ok = ~missing
    same[ok] = (
        np.abs(ours.vectors[at_rows[ok]] - theirs.vectors[rows[ok]]).max(axis=1, initial=0) <= 1e-6
    )
    bad = np.flatnonzero(~same)
    if len(bad):
        names = want["symbol"].to_list()
        example = ", ".join(str(names[i]) for i in bad[:5])
        raise StoreError(
            f"Store {store}: its {theirs.model} gene table differs from the bundle's in "
            f"{len(bad):,} of the atlas's {len(rows):,} genes ({int(missing.sum()):,} missing, "
            f"{int((~missing & ~same).sum()):,} with other vectors; e.g. {example}), so the atlas "
            "would be mapped with other gene vectors than it was built with. Fix: import it into "
            "another store (--store NEW_DIR), or map straight from the bundle with "
            f"`cellvec map QUERY --atlas {source}`."
        )
    return at_rows
