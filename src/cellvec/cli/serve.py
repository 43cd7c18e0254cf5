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
    help="Server processes (each loads the atlases it serves; throughput grows with cores).",
)
def serve_cmd(store, host, port, enable_sql, workers):
    """Serve the HTTP API (OpenAPI docs at /docs). Bearer auth when $CELLVEC_API_TOKEN is set.

    \b
    Example:
      CELLVEC_API_TOKEN=secret cellvec serve --store store/ --port 8000 --enable-sql
    """
    import os

    import uvicorn

    from cellvec.service.app import create_app

    if workers == 1:
        uvicorn.run(
            create_app(store, enable_sql=enable_sql), host=host, port=port, log_level="info"
        )
        return
    create_app(store, enable_sql=enable_sql)  # fail here, once, on a bad store
    os.environ["CELLVEC_STORE"] = str(Path(store).resolve())
    os.environ["CELLVEC_ENABLE_SQL"] = "1" if enable_sql else "0"
    uvicorn.run(
        "cellvec.service.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
    )
