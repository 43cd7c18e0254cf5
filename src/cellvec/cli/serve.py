"""`cellvec serve`: the HTTP service over one store."""

from __future__ import annotations

from pathlib import Path

import click

from cellvec.cli.options import store_option


@click.command("serve")
@store_option
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
def serve_cmd(store, host, port, enable_sql, workers, batch_wait_ms, cache_dir, access_log):
    """Serve the HTTP API (OpenAPI docs at /docs). Bearer auth when $CELLVEC_API_TOKEN is set.

    Runs on uvicorn with uvloop and httptools when installed (the `serve` extra).

    \b
    Example:
      CELLVEC_API_TOKEN=secret cellvec serve --store store/ --port 8000 --workers 2
    """
    import os

    import uvicorn

    from cellvec.service.app import create_app

    settings = dict(
        enable_sql=enable_sql,
        batch_wait_ms=batch_wait_ms,
        cache_dir=str(Path(cache_dir).resolve()) if cache_dir else None,
    )
    server = dict(host=host, port=port, log_level="info", access_log=access_log)
    if workers == 1:
        uvicorn.run(create_app(store, **settings), **server)
        return
    create_app(store, **settings)  # fail here, once, on a bad store
    os.environ["CELLVEC_STORE"] = str(store.path.resolve()) if store.is_local else store.uri
    os.environ.update(store.to_env())  # the workers' storage options
    os.environ["CELLVEC_ENABLE_SQL"] = "1" if enable_sql else "0"
    os.environ["CELLVEC_BATCH_WAIT_MS"] = str(batch_wait_ms)
    if settings["cache_dir"]:
        os.environ["CELLVEC_CACHE_DIR"] = settings["cache_dir"]
    uvicorn.run("cellvec.service.app:create_app_from_env", factory=True, workers=workers, **server)
