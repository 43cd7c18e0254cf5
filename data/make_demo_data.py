"""Regenerate the demo data in this folder from sources installable from PyPI and Debian.

Sources:
- scanpy (PyPI, BSD-3) ships `datasets/10x_pbmc68k_reduced.h5ad`: 700 human PBMCs x 765 genes,
  labels in obs['bulk_labels'], log-normalised values in .raw (its X is scaled).
- Debian's Bioconductor packages r-bioc-org.hs.eg.db (org.Hs.eg.sqlite: NCBI Gene symbols,
  names, aliases, types, Ensembl ids and GO annotations) and r-bioc-go.db (GO.sqlite: GO term
  names), both Artistic-2.0; only their SQLite files are read, R is not needed.

Outputs (written here):
- pbmc68k_reduced.h5ad: X = the log-normalised .raw values (sparse float32), obs bulk_labels.
- human_pbmc68k.gene_info.gz / human_pbmc68k.gene2go.gz: the dataset's genes in NCBI's own
  gene_info (16 columns) and gene2go (8 columns) formats, so the demo runs the real readers.

Usage:
    pip install scanpy                      # for its bundled dataset
    python data/make_demo_data.py           # fetches the two .deb files with apt-get download
    python data/make_demo_data.py --orgdb PATH/org.Hs.eg.sqlite --godb PATH/GO.sqlite
"""

from __future__ import annotations

import argparse
import gzip
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEBIAN_PACKAGES = {"orgdb": "r-bioc-org.hs.eg.db", "godb": "r-bioc-go.db"}
SQLITE_NAMES = {"orgdb": "org.Hs.eg.sqlite", "godb": "GO.sqlite"}


def fetch_debian_sqlite(workdir: Path) -> dict[str, Path]:
    """apt-get download the two packages and unpack them (no install, no R)."""
    out = {}
    for key, pkg in DEBIAN_PACKAGES.items():
        subprocess.run(["apt-get", "download", pkg], cwd=workdir, check=True)
        deb = next(workdir.glob(f"{pkg}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(workdir / "x")], check=True)
        out[key] = next((workdir / "x").rglob(SQLITE_NAMES[key]))
    return out


def scanpy_dataset() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("scanpy")
    if spec is None:
        raise SystemExit(
            "scanpy is not installed: pip install scanpy (its wheel ships the dataset)."
        )
    return Path(spec.origin).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"


def write_expression(src: Path, dest: Path):
    import anndata as ad
    import scipy.sparse as sp

    a = ad.read_h5ad(src)
    raw = a.raw.to_adata()
    out = ad.AnnData(
        sp.csr_matrix(raw.X, dtype=np.float32),
        obs=a.obs[["bulk_labels", "louvain"]].copy(),
        var=raw.var[[]].copy(),
    )
    out.uns["source"] = "scanpy datasets/10x_pbmc68k_reduced.h5ad (.raw: log-normalised); BSD-3"
    out.write_h5ad(dest, compression="gzip")
    return list(map(str, out.var_names))


def write_gene_files(
    genes: list[str], orgdb: Path, godb: Path, info_out: Path, go_out: Path
) -> int:
    org = sqlite3.connect(orgdb)
    terms = dict(sqlite3.connect(godb).execute("SELECT go_id, term FROM go_term"))
    wanted = set(genes)
    rows = org.execute(
        "SELECT g._id, g.gene_id, i.symbol, i.gene_name FROM genes g JOIN gene_info i USING (_id)"
    ).fetchall()
    aliases: dict[int, list[str]] = {}
    for _id, alias in org.execute("SELECT _id, alias_symbol FROM alias"):
        aliases.setdefault(_id, []).append(alias)
    keep = [r for r in rows if r[2] in wanted or wanted & set(aliases.get(r[0], []))]
    ids = {r[0] for r in keep}
    ens = {}
    for _id, e in org.execute("SELECT _id, ensembl_id FROM ensembl"):
        if _id in ids:
            ens.setdefault(_id, e)
    gtype = dict(org.execute("SELECT _id, gene_type FROM genetype"))
    header = (
        "#tax_id\tGeneID\tSymbol\tLocusTag\tSynonyms\tdbXrefs\tchromosome\tmap_location\tdescription\t"
        "type_of_gene\tSymbol_from_nomenclature_authority\tFull_name_from_nomenclature_authority\t"
        "Nomenclature_status\tOther_designations\tModification_date\tFeature_type\n"
    )
    lines = [header]
    for _id, gene_id, symbol, name in keep:
        syn = "|".join(a for a in aliases.get(_id, []) if a != symbol) or "-"
        xref = f"Ensembl:{ens[_id]}" if _id in ens else "-"
        gt = gtype.get(_id) or "unknown"
        lines.append(
            f"9606\t{gene_id}\t{symbol}\t-\t{syn}\t{xref}\t-\t-\t{name}\t{gt}\t{symbol}\t{name}\tO\t-\t-\t-\n"
        )
    info_out.write_bytes(gzip.compress("".join(lines).encode(), mtime=0))
    cat = {"go_bp": "Process", "go_mf": "Function", "go_cc": "Component"}
    go_lines = ["#tax_id\tGeneID\tGO_ID\tEvidence\tQualifier\tGO_term\tPubMed\tCategory\n"]
    gid = {r[0]: r[1] for r in keep}
    for table, category in cat.items():
        for _id, go_id, evidence in org.execute(
            f"SELECT _id, go_id, evidence FROM {table} ORDER BY _id"
        ):
            if _id in gid and go_id in terms:
                go_lines.append(
                    f"9606\t{gid[_id]}\t{go_id}\t{evidence}\t-\t{terms[go_id]}\t-\t{category}\n"
                )
    go_out.write_bytes(gzip.compress("".join(go_lines).encode(), mtime=0))
    return len(keep)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--orgdb", type=Path, help="org.Hs.eg.sqlite (default: download the Debian package)"
    )
    ap.add_argument("--godb", type=Path, help="GO.sqlite (default: download the Debian package)")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"orgdb": args.orgdb, "godb": args.godb}
        if not (args.orgdb and args.godb):
            paths = fetch_debian_sqlite(Path(tmp))
        genes = write_expression(scanpy_dataset(), args.out / "pbmc68k_reduced.h5ad")
        n = write_gene_files(
            genes,
            paths["orgdb"],
            paths["godb"],
            args.out / "human_pbmc68k.gene_info.gz",
            args.out / "human_pbmc68k.gene2go.gz",
        )
    print(f"{len(genes)} dataset genes; {n} NCBI genes written to {args.out}")


if __name__ == "__main__":
    main()
