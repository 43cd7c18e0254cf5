"""Fuzz every operation of the HTTP API's OpenAPI schema: no input may cause a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, settings  # noqa: E402

from conftest import FakeEmbedder, tiny_adata  # noqa: E402

pytestmark = pytest.mark.slow


def _schema(tmp):
    from cellvec.cell_index.build import build_atlas
    from cellvec.cell_index.recipe import Recipe
    from cellvec.gene_store import build_gene_store
    from cellvec.service import create_app
    from conftest import tiny_genes, write_gene2go, write_gene_info

    genes = tiny_genes()
    build_gene_store(
        write_gene_info(tmp / "g.gz", genes),
        gene2go=write_gene2go(tmp / "go.gz", genes),
        store=tmp / "store",
        species="human",
        embedder=FakeEmbedder(),
    )
    build_atlas(
        tiny_adata(n_cells=60),
        store=tmp / "store",
        name="tiny",
        label_key="cell_type",
        recipe=Recipe(top_genes=10),
    )
    return schemathesis.openapi.from_asgi(
        "/openapi.json", create_app(tmp / "store", enable_sql=True)
    )


def test_no_server_errors(tmp_path, monkeypatch):
    """Every operation, 40 generated requests each (the pytest plugin does not run on pytest 9)."""
    from hypothesis import given

    import cellvec.gene_store.store as store_mod

    monkeypatch.setattr(store_mod, "get_embedder", lambda spec, **kw: FakeEmbedder())
    schema = _schema(tmp_path)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 8
    failures = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case):
            response = case.call()
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}"
                )

        check()
    assert failures == []
