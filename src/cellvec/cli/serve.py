"""`cellvec serve`: the HTTP service over one store."""

from __future__ import annotations

from pathlib import Path

import click

from cellvec.cli.options import STORE_HELP, store_options


@click.command("serve")
@store_options(required=False, help=STORE_HELP + " Not needed with --atlas.")
@click.option(
    "--atlas",
    "bundle",
    metavar="PATH_OR_URL",
    help="Serve the atlas of a bundle (`cellvec atlas export`: a folder, https://... or "
    "s3://...), fetched once into $CELLVEC_CACHE and verified; no --store then.",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option(
    "--enable-sql", is_flag=True, help="Expose POST /v1/sql (read-only, row and time limits)."
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    help="Server processes; they share each atlas's index through memory maps.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Threads of each numeric pool in each worker (numpy's BLAS, faiss's OpenMP, torch; "
    "sets OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS). Default: the cores this "
    "process may use divided by --workers, less one for the worker's event loop, at least 1 "
    "(1 on 2 cores), so that no pool thread spins on a core another thread needs.",
)
@click.option(
    "--batch-wait-ms",
    default=2.0,
    show_default=True,
    help="How long a map request may wait for concurrent ones to share one encode and "
    "search (0: no batching).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Local folder where atlases are written for memory-mapping (default: STORE/_serving "
    "for a local store; a store in a bucket is held in memory, one copy per worker).",
)
@click.option("--access-log", is_flag=True, help="Log every request (off: it costs throughput).")
def serve_cmd(
    store, bundle, host, port, enable_sql, workers, threads, batch_wait_ms, cache_dir, access_log
):
    """Serve the HTTP API (OpenAPI docs at /docs). Bearer auth when $CELLVEC_API_TOKEN is set.

    Runs on uvicorn with uvloop and httptools when installed (the `serve` extra). Each
    worker's numeric thread pools get its share of the cores (--threads), as pool threads
    that spin on another worker's core slowed two workers to a quarter of one.

    \b
    Example:
      CELLVEC_API_TOKEN=secret cellvec serve --store store/ --port 8000 --workers 2
      cellvec serve --atlas https://example.org/atlases/rgc.cellvec
    """
    import os

    from cellvec.service.threads import pool_size, set_pool_env

    # before numpy, faiss or torch load, here and in the worker processes
    threads = threads or pool_size(workers)
    set_pool_env(threads)

    import uvicorn

    from cellvec.service.app import create_app

    store, cache_dir = _store_of(store, bundle, cache_dir)

    settings = dict(
        enable_sql=enable_sql,
        batch_wait_ms=batch_wait_ms,
        cache_dir=str(Path(cache_dir).resolve()) if cache_dir else None,
        threads=threads,
    )
    server = dict(host=host, port=port, log_level="info", access_log=access_log)
    if workers == 1:
        uvicorn.run(create_app(store, **settings, freeze_heap=True), **server)
        return
    create_app(store, **settings)  # fail here, once, on a bad store
    os.environ["CELLVEC_STORE"] = str(store.path.resolve()) if store.is_local else store.uri
    os.environ.update(store.to_env())  # the workers' storage options
    os.environ["CELLVEC_ENABLE_SQL"] = "1" if enable_sql else "0"
    os.environ["CELLVEC_BATCH_WAIT_MS"] = str(batch_wait_ms)
    if settings["cache_dir"]:
        os.environ["CELLVEC_CACHE_DIR"] = settings["cache_dir"]
    uvicorn.run("cellvec.service.app:create_app_from_env", factory=True, workers=workers, **server)


def _store_of(store, bundle, cache_dir):
    """(the store to serve, --cache-dir): --store, or the verified cached copy of the bundle
    --atlas names, whose serving files then go beside it rather than into it."""
    if (store is None) == (bundle is None):
        raise click.UsageError("Give --store DIR or --atlas BUNDLE (one of them).")
    if bundle is None:
        return store, cache_dir
    from cellvec.fetch import resolve_atlas

    store, _ = resolve_atlas(None, bundle)
    path = store.path
    return store, cache_dir or str(path.parent.parent / "serving" / path.name)
