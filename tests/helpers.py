"""What the tests share that is not a fixture: tiny real-format gene files, a deterministic
fake embedder, small AnnData, the tiny atlases and requests built from them.

The fixtures built on these live in conftest.py; the servers tests start live in servers.py.
Importing this module does nothing but define them (conftest.py registers the fake embedder).
"""

from __future__ import annotations

import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from cellvec.gene_store.embedders.base import Embedder

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The metrics every `--json` result carries (DESIGN.md's CLI contract).
METRIC_KEYS = {
    "accuracy",
    "macro_f1",
    "balanced_accuracy",
    "per_class",
    "n_cells",
    "unassigned_fraction",
}

requires_shared = pytest.mark.skipif(not SHARED.exists(), reason=f"real data not found at {SHARED}")


class FakeEmbedder(Embedder):
    """Bag of hashed words: texts sharing words get similar vectors. Stable across processes."""

    batch_size = 16

    def __init__(self, name: str = "", dim: int = 64, **_):
        self.spec = f"fake:{name}" if name else "fake"
        self.dim = dim
        self.calls = 0
        self.n_embedded = 0

    def embed_batch(self, texts):
        self.calls += 1
        self.n_embedded += len(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z0-9]+", t.lower()):
                h = int(hashlib.md5(w.encode()).hexdigest()[:8], 16)
                out[i, h % self.dim] += 1.0 if (h >> 8) & 1 else -1.0
        return out


# Three groups of genes with distinct GO vocabularies, so cell types built from them separate.
GROUPS = {
    "T": ("T cell receptor signaling pathway", "immune synapse", "lymphocyte activation"),
    "B": ("B cell receptor signaling pathway", "immunoglobulin production", "antigen binding"),
    "M": ("phagocytosis", "lysozyme activity", "inflammatory response monocyte"),
}
HEADER = (
    "#tax_id\tGeneID\tSymbol\tLocusTag\tSynonyms\tdbXrefs\tchromosome\tmap_location\tdescription\t"
    "type_of_gene\tSymbol_from_nomenclature_authority\tFull_name_from_nomenclature_authority\t"
    "Nomenclature_status\tOther_designations\tModification_date\tFeature_type\n"
)


def tiny_genes(n_per_group: int = 10) -> list[dict]:
    genes = []
    gid = 1000
    for g, (proc, comp, func) in GROUPS.items():
        for i in range(n_per_group):
            gid += 1
            genes.append(
                {
                    "id": gid,
                    "symbol": f"{g}GENE{i}",
                    "syn": f"{g}ALIAS{i}|{g}OLD{i}",
                    "ens": f"ENSG{gid:011d}",
                    "name": f"{g} lineage gene {i}",
                    "proc": proc,
                    "comp": comp,
                    "func": func,
                }
            )
    return genes


def write_gene_info(path: Path, genes: list[dict], tax: int = 9606, gz: bool = True) -> Path:
    lines = [HEADER]
    for g in genes:
        lines.append(
            f"{tax}\t{g['id']}\t{g['symbol']}\t-\t{g['syn']}\tHGNC:HGNC:{g['id']}|Ensembl:{g['ens']}\t1\t1p1\t"
            f"{g['name']}\tprotein-coding\t{g['symbol']}\t{g['name']}\tO\t{g['name']} protein\t20200101\t-\n"
        )
    data = "".join(lines).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_gene2go(path: Path, genes: list[dict], tax: int = 9606) -> Path:
    lines = ["#tax_id\tGeneID\tGO_ID\tEvidence\tQualifier\tGO_term\tPubMed\tCategory\n"]
    for g in genes:
        lines.append(f"{tax}\t{g['id']}\tGO:0000001\tIEA\tinvolved_in\t{g['proc']}\t-\tProcess\n")
        lines.append(f"{tax}\t{g['id']}\tGO:0000002\tIEA\tlocated_in\t{g['comp']}\t-\tComponent\n")
        lines.append(f"{tax}\t{g['id']}\tGO:0000003\tIEA\tenables\t{g['func']}\t-\tFunction\n")
        lines.append(f"{tax}\t{g['id']}\tGO:0000004\tIEA\tNOT enables\tnever shown\t-\tFunction\n")
    path.write_bytes(gzip.compress("".join(lines).encode()))
    return path


def write_gene_files(folder: Path, genes: list[dict] | None = None) -> dict:
    """`genes` (default the tiny human set, `tiny_genes()`) as NCBI files in `folder`:
    {"genes", "gene_info", "gene2go"}, the dict `build_tiny` takes."""
    genes = tiny_genes() if genes is None else genes
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "genes": genes,
        "gene_info": write_gene_info(folder / "tiny.gene_info.gz", genes),
        "gene2go": write_gene2go(folder / "tiny.gene2go.gz", genes),
    }


def build_tiny(gene_files: dict, store, embedder=None, **options):
    """Build the gene files `gene_files` (`write_gene_files`) into `store` with the fake
    embedder (or `embedder`); `options` go to `build_gene_store`."""
    from cellvec.gene_store import build_gene_store

    return build_gene_store(
        gene_files["gene_info"],
        gene2go=gene_files["gene2go"],
        store=store,
        species="human",
        embedder=embedder or FakeEmbedder(),
        **options,
    )


def tiny_store(folder: Path, genes: list[dict] | None = None, *, embedder=None) -> Path:
    """The tests' gene store: `genes` (default the tiny human set) written as NCBI files in
    `folder` and built with the fake embedder (or `embedder`) into `folder / "store"`."""
    build_tiny(write_gene_files(folder, genes), folder / "store", embedder)
    return folder / "store"


def tiny_adata(n_cells: int = 60, seed: int = 0, counts: bool = True, prefix: str = "c"):
    """Cells of types T, B, M, each expressing mostly its own genes (raw counts)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    genes = tiny_genes()
    names = [g["symbol"] for g in genes]
    types = np.array(list(GROUPS))[np.arange(n_cells) % 3]
    x = rng.poisson(0.3, size=(n_cells, len(names))).astype(np.float32)
    for i, t in enumerate(types):
        own = [j for j, n in enumerate(names) if n.startswith(t)]
        x[i, own] += rng.poisson(8, size=len(own))
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(types),
            "batch": np.where(np.arange(n_cells) < n_cells // 2, "a", "b"),
        },
        index=[f"{prefix}{i}" for i in range(n_cells)],
    )
    a = ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=names))
    if not counts:
        a.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4))
    return a


def build_tiny_atlas(store):
    """Atlas `tiny` in `store`: 90 tiny cells of types T, B, M, top 10 genes, typicality
    calibrated on held-out cells."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.recipe import Recipe

    return build_atlas(
        tiny_adata(n_cells=90, seed=1),
        store=store,
        name="tiny",
        label_key="cell_type",
        recipe=Recipe(top_genes=10),
        options=BuildOptions(calibration_split=0.2),  # held-out cells calibrate typicality
    )


def build_centroid_atlas(store, name: str = "few"):
    """Atlas `name` in `store`: 30 tiny cells of types T, B, M, top 10 genes, unrefined,
    read by its class centroids."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.recipe import Recipe

    return build_atlas(
        tiny_adata(n_cells=30, seed=1),
        store=store,
        name=name,
        label_key="cell_type",
        recipe=Recipe(top_genes=10, refine="none"),
        options=BuildOptions(readout="centroid"),
    )


def centroid_scores(atlas, vectors, *, over=None, exclude=()):
    """The class probabilities the centroid read-out owes query `vectors`: `Prototypes`
    fitted on the atlas's vectors (or on `over`, the atlas re-aggregated over a panel),
    with the `exclude`d labels at 0."""
    from cellvec.cell_index.calls import Prototypes

    labels = atlas.labels.astype(str)
    classes = np.unique(labels)
    fitted = Prototypes.of(
        atlas.vectors if over is None else over, np.searchsorted(classes, labels), len(classes)
    )
    return fitted.scores(vectors, ~np.isin(classes, exclude))


def request_cells(n=5, seed=3):
    """A JSON map request of `n` tiny cells, and their true labels."""
    a = tiny_adata(n_cells=n, seed=seed, prefix="q")
    x = a.X.tocsr()
    cells = [
        {"id": a.obs_names[i], "indices": x[i].indices.tolist(), "values": x[i].data.tolist()}
        for i in range(n)
    ]
    return {"genes": list(a.var_names), "cells": cells}, a.obs["cell_type"].astype(str).tolist()


def two_levels(seed=1, n=90, prefix="c"):
    """Tiny cells with fine labels T_a / T_b (random halves of the T cells, alike in
    expression, so the fine vote splits) under broad T; B and M are their own broad class."""
    a = tiny_adata(n_cells=n, seed=seed, prefix=prefix)
    broad = a.obs["cell_type"].astype(str).to_numpy()
    fine = broad.copy()
    t = np.flatnonzero(broad == "T")
    fine[t] = np.where(np.random.default_rng(seed).random(len(t)) < 0.5, "T_a", "T_b")
    a.obs["cell_type"], a.obs["cell_type_broad"] = fine, broad
    return a


# -- disk index: the atlases its tests build, and recall against exact search --------------


def indexed_atlas(store, name, index, n_cells=1200, adata=None, **kw):
    """The disk index tests' atlas: `adata` (default `n_cells` tiny cells) built unrefined
    with a calibration split and the index `index`; `kw` adds to or overrides the options."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.recipe import Recipe

    return build_atlas(
        tiny_adata(n_cells=n_cells, seed=1) if adata is None else adata,
        store=store,
        name=name,
        label_key="cell_type",
        recipe=Recipe(top_genes=10, refine="none"),
        options=BuildOptions(calibration_split=0.1, index=index),
        **kw,
    )


def tie_aware_recall(sim_ann, sim_exact) -> float:
    """Share of ANN neighbours at least as similar as the exact k-th neighbour (faiss
    contrib's tie-aware measure: identical cells make neighbour identities arbitrary)."""
    kth = sim_exact[:, -1:]
    return float((sim_ann >= kth - 1e-5).mean())


def index_recall(index, vecs, step: int, k: int = 15) -> float:
    """Tie-aware recall@k of every `step`-th atlas cell searched through `index`."""
    from cellvec.cell_index.knn import FlatIndex

    q = vecs[::step]
    return tie_aware_recall(index.search(q, k)[1], FlatIndex(vecs).search(q, k)[1])


def seed_spread(store, name: str, step: int, seeds: int) -> np.ndarray:
    """Recall (`index_recall`) of atlas `name`'s disk index trained with each of `seeds`
    seeds: what a floor is set from, since one seed makes one figure on every run."""
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.disk_index import DiskIndex, build_disk_index, choose_params

    atlas = Atlas.open(store, name)
    vecs = atlas.vectors
    params = choose_params(*vecs.shape)
    out = []
    for seed in range(seeds):
        ds = build_disk_index(atlas.dataset(), params, seed=seed)
        out.append(index_recall(DiskIndex(ds, params), vecs, step))
    return np.array(out)


# -- damaged files, as an attacker or a broken writer would make them --------------------


def replace_dataset(f, key: str, values) -> None:
    """Dataset `key` of an open h5py file rewritten with `values`."""
    del f[key]
    f[key] = values


def _no_values(f) -> None:
    """No values at all, and an index pointer that claims 10**8 of them for the first
    cell: scipy's full check skips the pointer when the matrix holds no values."""
    indptr = np.zeros(len(f["X/indptr"]), np.int64)
    indptr[1] = 10**8
    replace_dataset(f, "X/data", np.zeros(0, np.float32))
    replace_dataset(f, "X/indices", np.zeros(0, np.int32))
    replace_dataset(f, "X/indptr", indptr)


# Ways an h5ad's sparse X can point outside itself (edits of an open h5py file, X in CSR
# of 6+ cells): scipy builds the matrix unchecked and its compiled code reads past it
SPARSE_DAMAGE = {
    "a column index past the last gene": lambda f: replace_dataset(
        f, "X/indices", np.r_[10**6, f["X/indices"][1:]]
    ),
    "a negative column index": lambda f: replace_dataset(
        f, "X/indices", np.r_[-5, f["X/indices"][1:]].astype(np.int64)
    ),
    "an index pointer that runs backwards": lambda f: replace_dataset(
        f, "X/indptr", np.r_[f["X/indptr"][:2], 0, f["X/indptr"][3:]]
    ),
    "an index pointer past values it does not have": _no_values,
}
