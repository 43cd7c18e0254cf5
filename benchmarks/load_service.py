"""Load test of the HTTP service with wrk on loopback: /map against /healthz in the same run.

Builds a store with a synthetic atlas (`--atlas-cells`, default 500 cells, as the
issue's pbmc68k_reduced atlas of 490; 384-d like MiniLM), starts `cellvec serve`
on 127.0.0.1 (free ports) with 1 and 2 workers, both running at once, and drives
each in turn with wrk (a native load generator; install it with `apt-get install
wrk`: this script installs nothing) for `--seconds` per setting: `/healthz` (the
server's own floor), then `POST /v1/atlases/bench/map` with 1 cell (JSON) and
1,000 cells (JSON and Arrow IPC) per request, at 1, 8, 32 and 128 connections.
Each setting is measured on every server back to back (`--repeat` times over,
medians shown), so 1 and 2 workers are compared within seconds of each other; with
`--baseline-src` (a source tree of older code, e.g. from `git worktree add /tmp/base
HEAD`) its servers run beside these and each row gets an after/before ratio.
Printed: p50/p99 latency, requests/s, cells/s, errors (non-2xx, timeouts, socket
errors; target none), the ratio of map to healthz requests/s at the same
concurrency, the server's CPU time per request (all its processes; useful where
other work shares the machine), 2 workers against 1 side by side, threads per
worker process, and the load average. Then a large atlas (`--memory-atlas-cells`,
default 250,000: above 200,000 an IVF index) is served by 1 and 2 workers: 1-cell
requests, and resident memory per worker after a warm-up: RSS, and PSS (shared
pages split between the processes that map them), beside the size of the atlas's
index file; a first server, not measured, writes that file and each server maps a
copy of its own. Only 127.0.0.1 is contacted; every server is stopped at the end.

    python benchmarks/load_service.py [--seconds 5] [--workers 1,2] [--clients 1,8,32,128]
        [--repeat 1] [--baseline-src /tmp/base/src]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 (run on cellvec's pinned numerical kernels)
import numpy as np

LUA = r"""
local body_path = os.getenv("CELLVEC_BODY")
if body_path and body_path ~= "" then
  local f = assert(io.open(body_path, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = os.getenv("CELLVEC_CTYPE")
  wrk.headers["Accept"] = os.getenv("CELLVEC_ACCEPT")
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nRESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"errors": %d, "non2xx": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def make_store(
    tmp: Path, n_cells: int, n_genes: int = 2000, dim: int = 384, seed: int = 0
) -> list[str]:
    """A store with synthetic gene vectors and an atlas `bench` of `n_cells` cells in 20 types."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from cellvec.cell_index.build import build_atlas
    from cellvec.cell_index.recipe import Recipe
    from cellvec.gene_store.store import import_vectors

    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    np.savez(
        tmp / "v.npz",
        genes=np.array(genes),
        vectors=rng.normal(size=(n_genes, dim)).astype(np.float32),
    )
    import_vectors(tmp / "v.npz", store=tmp / "store", model="bench", species="human")
    n_types = 20
    types = rng.integers(0, n_types, n_cells)
    programs = rng.integers(0, n_genes, size=(n_types, 60))
    # 60 program genes (raised) + 140 random genes per cell; duplicates are summed
    cols = np.concatenate([programs[types], rng.integers(0, n_genes, (n_cells, 140))], axis=1)
    vals = rng.gamma(1.0, 1.0, cols.shape).astype(np.float32)
    vals[:, :60] += 2.0
    x = sp.csr_matrix(
        (vals.ravel(), (np.repeat(np.arange(n_cells), cols.shape[1]), cols.ravel())),
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
        a,
        store=tmp / "store",
        name="bench",
        label_key="type",
        model="bench",
        recipe=Recipe(top_genes=100),
    )
    return genes


def query_cells(genes: list[str], n: int, seed: int):
    """`n` query cells of ~200 non-zero genes: (ids, list of index arrays, list of value arrays)."""
    rng = np.random.default_rng(seed)
    idx = [np.unique(rng.integers(0, len(genes), 200)) for _ in range(n)]
    vals = [rng.gamma(1.0, 1.0, len(i)).round(3).astype(np.float32) for i in idx]
    return [f"q{i}" for i in range(n)], idx, vals


def json_body(genes, n, seed) -> bytes:
    ids, idx, vals = query_cells(genes, n, seed)
    cells = [
        {"id": c, "indices": i.tolist(), "values": v.tolist()} for c, i, v in zip(ids, idx, vals)
    ]
    return json.dumps({"genes": genes, "cells": cells}).encode()


def arrow_body(genes, n, seed) -> bytes:
    """Long format: cell_id, gene (dictionary-encoded over the full gene list), value."""
    import pyarrow as pa

    ids, idx, vals = query_cells(genes, n, seed)
    counts = [len(i) for i in idx]
    table = pa.table(
        {
            "cell_id": pa.array(np.repeat(np.array(ids), counts)),
            "gene": pa.DictionaryArray.from_arrays(
                pa.array(np.concatenate(idx).astype(np.int32)), pa.array(genes)
            ),
            "value": pa.array(np.concatenate(vals)),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mib(pid: int) -> dict:
    """RSS and PSS of a process (MiB), from /proc/PID/smaps_rollup."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    out[key.lower()] = round(int(rest.split()[0]) / 1024)
    except OSError:
        pass
    return out


def serving_pids(root: int) -> list[int]:
    """The processes that serve requests: the children of `root` (uvicorn workers), else root."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == root:
                cmd = (d / "cmdline").read_bytes()
                if b"resource_tracker" not in cmd:
                    kids.append(int(d.name))
    return sorted(kids) or [root]


def wrk(url, lua, clients, seconds, body=None, ctype="", accept="application/json") -> dict:
    env = dict(os.environ, CELLVEC_BODY=str(body or ""), CELLVEC_CTYPE=ctype, CELLVEC_ACCEPT=accept)
    cmd = ["wrk", f"-t{min(2, clients)}", f"-c{clients}", f"-d{seconds}s", "--timeout", "10s"]
    proc = subprocess.run(
        [*cmd, "-s", str(lua), url], env=env, capture_output=True, text=True, timeout=seconds + 60
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {proc.stdout}\n{proc.stderr}")
    r = json.loads(line[len("RESULT ") :])
    secs = r["duration_us"] / 1e6
    return {
        "p50_ms": r["p50_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "requests_per_s": r["requests"] / secs,
        "requests": r["requests"],
        "errors": r["errors"] + r["non2xx"],
    }


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def start_server(store: Path, workers: int, batch_wait_ms: float, extra: list[str], src=None):
    """`cellvec serve` on a free port of 127.0.0.1, from `src` (a source tree, e.g. a
    `git worktree` of an older commit) when given; returns (process, url) once ready."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "cellvec.cli", "-q", "serve", "--store", str(store)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    if batch_wait_ms is not None:
        cmd += ["--batch-wait-ms", str(batch_wait_ms)]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(src).resolve()), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    url = f"http://127.0.0.1:{port}"
    ready = 0
    for _ in range(3000):  # ready: every worker has loaded the atlas (/readyz says so)
        try:
            ready = ready + 1 if httpx.get(f"{url}/readyz", timeout=2).status_code == 200 else 0
            if ready >= 8 * workers:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.05)
        if proc.poll() is not None:
            break
    stop(proc)
    raise RuntimeError("the server did not start")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def measure(url, lua, clients, seconds, pids, *body) -> dict:
    cpu = cpu_seconds(pids)
    r = wrk(url, lua, clients, seconds, *body)
    r["cpu_ms_per_request"] = 1000 * (cpu_seconds(pids) - cpu) / max(r["requests"], 1)
    return r


def thread_counts(pids: list[int]) -> list[int]:
    """Threads of each process, from /proc/PID/task."""
    out = []
    for pid in pids:
        try:
            out.append(len(os.listdir(f"/proc/{pid}/task")))
        except OSError:
            out.append(0)
    return out


class Servers:
    """The servers under test, all started before the first row and all running until
    the last, so that each row is measured on every server back to back (1 and 2
    workers, this code and the baseline's): on a shared machine, settings measured
    minutes apart differ by more than the settings do."""

    def __init__(self, store: Path, args, codes: dict, cache_root: Path):
        # A first server, not measured, writes the atlas's serving files (and keeps that
        # heap); each server then maps a copy of its own, so that the PSS of its workers is
        # not shared with the other servers' (which would map the same pages).
        stop(start_server(store, 1, args.batch_wait_ms, args.serve_arg)[0])
        self.procs = {}
        try:
            for code, src in codes.items():
                for workers in args.workers:
                    cache = cache_root / f"{code}-{workers}"
                    shutil.copytree(store / "_serving", cache, dirs_exist_ok=True)
                    extra = [*args.serve_arg, "--cache-dir", str(cache)]
                    proc, url = start_server(store, workers, args.batch_wait_ms, extra, src)
                    # its workers are up once it is ready (start_server): found once here
                    self.procs[code, workers] = (proc, url, serving_pids(proc.pid))
        except BaseException:
            self.stop()
            raise

    def items(self):
        for (code, workers), (proc, url, serving) in self.procs.items():
            yield code, workers, url, sorted({proc.pid, *serving}), serving

    def stop(self):
        for proc, _, _ in self.procs.values():
            stop(proc)


def median_row(runs: list[dict]) -> dict:
    """The median of each number over repeated runs of one row (errors: summed)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(np.median([r[key] for r in runs]))
    out["errors"] = sum(r["errors"] for r in runs)
    out["runs"] = len(runs)
    return out


def run_rows(servers: Servers, settings: list[dict], lua, args) -> list[dict]:
    """Each setting (`what`, `url` path, `clients`, `cells`, `body`) on each server back to
    back, `--repeat` times over; one row per server and setting (medians over repeats)."""
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.repeat):
        for st in settings:
            for code, workers, url, pids, _serving in servers.items():
                r = measure(url + st["path"], lua, st["clients"], args.seconds, pids, *st["body"])
                r["load_1min"] = os.getloadavg()[0]
                key = (st["what"], st["clients"], code, workers)
                runs.setdefault(key, []).append(r)
                print(
                    json.dumps({"code": code, "workers": workers, **st, **r}, default=str),
                    file=sys.stderr,
                )
    setting = {(st["what"], st["clients"]): st for st in settings}
    by = {}
    for (what, clients, code, workers), rs in runs.items():
        st = setting[what, clients]
        r = median_row(rs)
        if st["cells"]:
            r["cells_per_s"] = r["requests_per_s"] * st["cells"]
        by[what, clients, code, workers] = {
            "what": what,
            "code": code,
            "workers": workers,
            "clients": clients,
            "cells": st["cells"],
            **r,
        }
    for (_, clients, code, workers), r in by.items():
        # 1-cell maps against /healthz on the same server and clients, in the same call
        floor = by.get(("GET /healthz", clients, code, workers))
        if r["cells"] == 1 and floor:
            r["vs_healthz"] = r["requests_per_s"] / floor["requests_per_s"]
    return list(by.values())


def main():
    def ints(v):
        return [int(x) for x in v.split(",")]

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--atlas-cells", type=int, default=500)
    ap.add_argument("--memory-atlas-cells", type=int, default=250_000, help="0: skip")
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per setting")
    ap.add_argument("--clients", type=ints, default=[1, 8, 32, 128])
    ap.add_argument("--big-clients", type=ints, default=[1, 8, 32], help="for 1,000-cell requests")
    ap.add_argument("--workers", type=ints, default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1, help="runs of each row (medians shown)")
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="also serve the code of this source tree (e.g. `git worktree add /tmp/base HEAD` "
        "then /tmp/base/src), each row right after this code's, and print after/before",
    )
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="passed to cellvec serve")
    ap.add_argument("--store", type=Path, help="reuse a store made by an earlier run (--keep)")
    ap.add_argument("--memory-store", type=Path, help="the same for the large atlas")
    ap.add_argument("--keep", type=Path, help="keep the generated stores in this directory")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra cellvec serve args")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk (the benchmark installs nothing).")
    codes = {"this": None}
    if args.baseline_src:
        codes = {"baseline": args.baseline_src, "this": None}

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        genes = [f"G{i}" for i in range(2000)]
        build_s = {}
        store = args.store or build(tmp / "small", args.atlas_cells, args.keep, build_s, "small")
        lua = tmp / "bench.lua"
        lua.write_text(LUA)
        bodies = {
            ("json", 1): (tmp / "one.json", json_body(genes, 1, 1)),
            ("json", 1000): (tmp / "big.json", json_body(genes, 1000, 2)),
            ("arrow", 1000): (tmp / "big.arrow", arrow_body(genes, 1000, 2)),
        }
        for path, data in bodies.values():
            path.write_bytes(data)
        ctypes = {"json": "application/json", "arrow": "application/vnd.apache.arrow.stream"}
        map_path = "/v1/atlases/bench/map"
        settings = [
            {"what": "GET /healthz", "path": "/healthz", "clients": c, "cells": 0, "body": ()}
            for c in args.clients
        ]
        for (fmt, n), (path, _) in bodies.items():
            for clients in args.clients if n == 1 else args.big_clients:
                settings.append(
                    {
                        "what": f"map {n:,} cell{'s' if n > 1 else ''}, {fmt}",
                        "path": map_path,
                        "clients": clients,
                        "cells": n,
                        "body": (path, ctypes[fmt], ctypes[fmt]),
                    }
                )
        memory, threads = [], []
        servers = Servers(store, args, codes, tmp / "serving-small")
        try:
            for code, workers, url, _pids, serving in servers.items():  # warm up
                wrk(url + map_path, lua, 8, 2, bodies[("json", 1)][0], ctypes["json"])
                memory.append((args.atlas_cells, code, workers, [memory_mib(p) for p in serving]))
                threads.append((code, workers, thread_counts(serving)))
            rows = run_rows(servers, settings, lua, args)
        finally:
            servers.stop()
        index_mib = {}
        if args.memory_atlas_cells:
            big = args.memory_store or build(
                tmp / "large", args.memory_atlas_cells, args.keep, build_s, "large"
            )
            servers = Servers(big, args, codes, tmp / "serving-large")
            try:
                for code, workers, url, _pids, serving in servers.items():
                    wrk(url + map_path, lua, 8, 3, bodies[("json", 1)][0], ctypes["json"])
                    memory.append(
                        (args.memory_atlas_cells, code, workers, [memory_mib(p) for p in serving])
                    )
                what = f"map 1 cell, json ({args.memory_atlas_cells:,}-cell atlas)"
                big_setting = {
                    "what": what,
                    "path": map_path,
                    "clients": 32,
                    "cells": 1,
                    "body": (bodies[("json", 1)][0], ctypes["json"], ctypes["json"]),
                }
                rows += run_rows(servers, [big_setting], lua, args)
            finally:
                servers.stop()
            files = list((big / "_serving" / "bench").glob("v*/index.faiss"))
            index_mib[args.memory_atlas_cells] = files[0].stat().st_size / 2**20 if files else 0
    report(rows, memory, threads, index_mib, args, build_s, load_before, os.getloadavg())


def report(rows, memory, threads, index_mib, args, build_s, load_before, load_after):
    """The tables: every row; workers side by side; this code against the baseline."""
    show_code = args.baseline_src is not None
    print(
        f"atlas: {args.atlas_cells:,} cells x 384 dims; wrk {args.seconds} s per row, "
        f"{args.repeat} run(s) each (medians); store builds (s): "
        f"{json.dumps({k: round(v) for k, v in build_s.items()})}; load average (1 min) "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"{os.cpu_count()} cores\n"
    )
    code_col = "code | " if show_code else ""
    print(
        f"| request | {code_col}workers | clients | p50 ms | p99 ms | req/s | cells/s "
        "| map/healthz | server CPU ms/req | errors |"
    )
    print("|---" * (10 + show_code) + "|")
    for r in rows:
        ratio = f"{r['vs_healthz']:.2f}" if "vs_healthz" in r else ""
        cells = f"{r['cells_per_s']:,.0f}" if r["cells"] else ""
        code = f"{r['code']} | " if show_code else ""
        print(
            f"| {r['what']} | {code}{r['workers']} | {r['clients']} | {r['p50_ms']:.1f} "
            f"| {r['p99_ms']:.1f} | {r['requests_per_s']:,.0f} | {cells} | {ratio} "
            f"| {r['cpu_ms_per_request']:.2f} | {r['errors']} |"
        )

    def cell(r):
        return f"{r['requests_per_s']:,.0f} ({r['p50_ms']:.1f} / {r['p99_ms']:.1f})"

    by = {(r["what"], r["clients"], r["code"], r["workers"]): r for r in rows}
    settings = list(dict.fromkeys((r["what"], r["clients"]) for r in rows))
    if len(args.workers) > 1:
        w0, rest = args.workers[0], args.workers[1:]
        print(
            f"\nWorkers side by side (same run), this code: req/s (p50 / p99 ms); ratio to "
            f"{w0} worker{'s' if w0 > 1 else ''}\n"
        )
        head = " | ".join(f"{w} workers | {w}/{w0}" for w in rest)
        print(f"| request | clients | {w0} worker{'s' if w0 > 1 else ''} | {head} |")
        print("|---" * (3 + 2 * len(rest)) + "|")
        for what, clients in settings:
            base = by.get((what, clients, "this", w0))
            if base is None:
                continue
            cols = []
            for w in rest:
                r = by.get((what, clients, "this", w))
                cols += [cell(r), f"{r['requests_per_s'] / base['requests_per_s']:.2f}"]
            print(f"| {what} | {clients} | {cell(base)} | {' | '.join(cols)} |")
    if show_code:
        print("\nThis code against the baseline (same run): req/s (p50 / p99 ms)\n")
        print("| request | workers | clients | baseline | this | req/s this/baseline |")
        print("|---|---|---|---|---|---|")
        for what, clients in settings:
            for w in args.workers:
                a, b = by.get((what, clients, "baseline", w)), by.get((what, clients, "this", w))
                if a and b:
                    ratio = b["requests_per_s"] / a["requests_per_s"]
                    print(f"| {what} | {w} | {clients} | {cell(a)} | {cell(b)} | {ratio:.2f} |")
    print(
        "\nThreads per worker process: "
        + "; ".join(
            f"{code} {w} worker{'s' if w > 1 else ''}: {', '.join(map(str, n))}"
            for code, w, n in threads
        )
    )
    print(
        f"\n| atlas cells | index file MiB | {code_col}workers | per worker RSS / PSS MiB "
        "| total PSS MiB |"
    )
    print("|---" * (5 + show_code) + "|")
    for cells, code, workers, mem in memory:
        per = ", ".join(f"{m.get('rss', '?')} / {m.get('pss', '?')}" for m in mem)
        total = sum(m.get("pss", 0) for m in mem)
        size = f"{index_mib[cells]:.0f}" if cells in index_mib else ""
        c = f"{code} | " if show_code else ""
        print(f"| {cells:,} | {size} | {c}{workers} | {per} | {total:,} |")


def build(folder: Path, n_cells: int, keep: Path | None, times: dict, name: str) -> Path:
    folder.mkdir(parents=True)
    t = time.perf_counter()
    make_store(folder, n_cells)
    times[name] = time.perf_counter() - t
    if keep:
        shutil.copytree(folder / "store", keep / name, dirs_exist_ok=True)
    return folder / "store"


if __name__ == "__main__":
    main()
