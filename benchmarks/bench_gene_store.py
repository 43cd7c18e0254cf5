"""Gene-store build vs plain `model.encode` on the same texts, in one run.

Prints the overhead ratio (target < 1.10) and the peak RSS of each, measured in
separate child processes so neither inherits the other's memory.

    python benchmarks/bench_gene_store.py [--genes 3000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, peak_rss_mib  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_inputs(workdir: Path, n: int) -> tuple[Path, Path | None]:
    """A gene_info subset of n mouse genes (every k-th, so text lengths are representative)."""
    src = SHARED / "genes" / "mouse.gene_info.gz"
    if not src.exists():
        sys.exit(f"{src} not found: this benchmark needs ../shared/data")
    with gzip.open(src, "rt") as fh:
        lines = fh.readlines()
    step = max(1, (len(lines) - 1) // n)
    out = workdir / "subset.gene_info"
    out.write_text(lines[0] + "".join(lines[1::step][:n]))
    return out, SHARED / "genes" / "mouse.gene2go.gz"


def run_plain(info, go, q):
    import time

    from sentence_transformers import SentenceTransformer

    from cellvec.gene_store.embedders.minilm import minilm_path
    from cellvec.gene_store.sources import read_gene2go, read_gene_info
    from cellvec.gene_store.text import compose_texts

    texts = compose_texts(read_gene_info(info, species="mouse"), read_gene2go(go, tax_id=10090))[
        "text"
    ].to_list()
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.encode(texts[:64], batch_size=64)  # warm-up, as the build's first batch is
    t = time.perf_counter()
    model.encode(texts, batch_size=64, normalize_embeddings=True)
    q.put({"seconds": time.perf_counter() - t, "n": len(texts), "peak_rss_mib": peak_rss_mib()})


def run_build(info, go, store, q):
    import time

    from cellvec.gene_store import build_gene_store, get_embedder

    emb = get_embedder("minilm")
    emb.embed(["warm-up"] * 64)
    t = time.perf_counter()
    res = build_gene_store(info, gene2go=go, species="mouse", store=store, embedder=emb)
    q.put({"seconds": time.perf_counter() - t, "n": res.n_genes, "peak_rss_mib": peak_rss_mib()})


def child(target, *args):
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=target, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--genes", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        info, go = make_inputs(Path(tmp), args.genes)
        plain = child(run_plain, info, go)
        build = child(run_build, info, go, str(Path(tmp) / "store"))
    ratio = build["seconds"] / plain["seconds"]
    print(
        json.dumps(
            {
                "genes": plain["n"],
                "plain_encode_s": round(plain["seconds"], 1),
                "store_build_s": round(build["seconds"], 1),
                "texts_per_s_plain": round(plain["n"] / plain["seconds"], 1),
                "texts_per_s_build": round(build["n"] / build["seconds"], 1),
                "overhead_ratio": round(ratio, 3),
                "peak_rss_mib_plain": round(plain["peak_rss_mib"]),
                "peak_rss_mib_build": round(build["peak_rss_mib"]),
                "target": "overhead_ratio < 1.10",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
