"""Fuzz every operation of the HTTP API's OpenAPI schema: no input may cause a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings  # noqa: E402

# Python 3.11.7 counts AST-constructor depth in one place for all threads (CPython
# gh-106905, fixed in 3.11.8). pytest rewrites schemathesis (a pytest11 plugin) as its
# modules load, and schemathesis loads its OpenAPI machinery lazily: loaded mid-suite, with
# an earlier test's server threads alive, the rewrite of its deep schema module failed once
# in CI ("SystemError: AST constructor recursion depth mismatch"). So it is loaded here, at
# collection, while nothing else runs: a one-operation schema, its operations and strategy.
_warm_up = schemathesis.openapi.from_dict(
    {
        "openapi": "3.0.0",
        "info": {"title": "warm-up", "version": "1"},
        "paths": {
            "/x": {
                "get": {
                    "parameters": [{"name": "q", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "ok"}},
                }
            }
        },
    }
)
next(iter(_warm_up.get_all_operations())).ok().as_strategy()

from helpers import tiny_adata  # noqa: E402

pytestmark = pytest.mark.slow


def _schema(store):
    from cellvec.cell_index.build import build_atlas
    from cellvec.cell_index.recipe import Recipe
    from cellvec.service import create_app

    build_atlas(
        tiny_adata(n_cells=60),
        store=store,
        name="tiny",
        label_key="cell_type",
        recipe=Recipe(top_genes=10),
    )
    # preload=False: atlases load on the first request that needs one, so /readyz is ready
    # from the start; with the background preload it answers 503 "retry in a moment" until
    # it ends, by design, and a fuzz case that came first was counted as a server error
    app = create_app(store, enable_sql=True, preload=False)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_server_errors(fake_store, fake_models):
    """Every operation, 40 generated requests each (the pytest plugin does not run on pytest 9)."""
    from hypothesis import given

    schema = _schema(fake_store)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 8
    failures = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,  # the same 40 requests on every run and machine
        )
        def check(case):
            response = case.call()
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}"
                )

        check()
    assert failures == []
