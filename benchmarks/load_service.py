"""Load test of the HTTP service on loopback: map 1 and 1,000 cells with 1, 8 and 32 clients.

Starts `cellvec serve` itself on 127.0.0.1 (a free port) over a store holding a
synthetic atlas (`--atlas-cells`, default 100,000, 128-d after refinement-free
whitening of fake gene vectors), then, for each request size and concurrency,
sends a bounded number of requests (`--requests`) within a bounded time
(`--seconds`), and reports p50/p99 latency, throughput and errors (target: none).
Only 127.0.0.1 is ever contacted; the server is stopped at the end.

    python benchmarks/load_service.py [--requests 200] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def make_store(tmp: Path, n_cells: int, n_genes: int = 2000, seed: int = 0) -> list[str]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from cellvec.cell_index.atlas import build_atlas
    from cellvec.gene_store.store import import_vectors

    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    np.savez(
        tmp / "v.npz",
        genes=np.array(genes),
        vectors=rng.normal(size=(n_genes, 64)).astype(np.float32),
    )
    import_vectors(tmp / "v.npz", store=tmp / "store", model="bench", species="human")
    n_types = 20
    types = rng.integers(0, n_types, n_cells)
    programs = rng.integers(0, n_genes, size=(n_types, 60))
    rows, cols, vals = [], [], []
    for i, t in enumerate(types):
        g = np.unique(np.concatenate([programs[t], rng.integers(0, n_genes, 140)]))
        rows.append(np.full(len(g), i))
        cols.append(g)
        vals.append(rng.gamma(1.0, 1.0, len(g)) + np.isin(g, programs[t]) * 2.0)
    x = sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_cells, n_genes),
    )
    a = ad.AnnData(
        x,
        obs=pd.DataFrame(
            {"type": [f"T{t}" for t in types]}, index=[f"c{i}" for i in range(n_cells)]
        ),
        var=pd.DataFrame(index=genes),
    )
    build_atlas(
        a, store=tmp / "store", name="bench", label_key="type", model="bench", top_genes=100
    )
    return genes


def payload(genes: list[str], n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    cells = []
    for i in range(n):
        idx = np.unique(rng.integers(0, len(genes), 200))
        cells.append(
            {
                "id": f"q{i}",
                "indices": idx.tolist(),
                "values": rng.gamma(1.0, 1.0, len(idx)).round(3).tolist(),
            }
        )
    return {"genes": genes, "cells": cells}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atlas-cells", type=int, default=100_000)
    ap.add_argument(
        "--requests", type=int, default=200, help="at most this many requests per setting"
    )
    ap.add_argument("--seconds", type=float, default=60, help="at most this long per setting")
    ap.add_argument("--clients", type=lambda v: [int(x) for x in v.split(",")], default=[1, 8, 32])
    ap.add_argument("--cells", type=lambda v: [int(x) for x in v.split(",")], default=[1, 1000])
    args = ap.parse_args()
    import httpx

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        genes = make_store(tmp, args.atlas_cells)
        build_s = time.perf_counter() - t
        port = free_port()
        env = dict(os.environ)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cellvec.cli",
                "-q",
                "serve",
                "--store",
                str(tmp / "store"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            bodies = {1: payload(genes, 1, 1), 1000: payload(genes, 1000, 2)}
            with httpx.Client(base_url=url, timeout=120) as c:
                c.post(
                    "/v1/atlases/bench/map", json=bodies[1]
                ).raise_for_status()  # load the atlas once
            results = []
            for n_cells, body in bodies.items():
                for clients in args.clients:
                    if n_cells not in args.cells:
                        continue
                    results.append(run(url, body, n_cells, clients, args.requests, args.seconds))
                    print(json.dumps(results[-1]), file=sys.stderr)
        finally:
            server.terminate()
            server.wait(10)
    print(
        json.dumps(
            {
                "atlas_cells": args.atlas_cells,
                "atlas_build_s": round(build_s, 1),
                "results": results,
            },
            indent=2,
        )
    )


def run(url, body, n_cells, clients, max_requests, max_seconds):
    import httpx

    latencies, errors = [], []
    deadline = time.perf_counter() + max_seconds
    counter = iter(range(max_requests))

    def worker():
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.perf_counter() < deadline:
                try:
                    next(counter)
                except StopIteration:
                    return
                t = time.perf_counter()
                try:
                    r = c.post("/v1/atlases/bench/map", json=body)
                    if r.status_code != 200 or len(r.json()["cells"]) != n_cells:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    errors.append(f"{type(e).__name__}: {e}")
                latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "cells_per_request": n_cells,
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "requests_per_s": round(len(lat) / wall, 1),
        "cells_per_s": round(len(lat) * n_cells / wall),
    }


if __name__ == "__main__":
    main()
