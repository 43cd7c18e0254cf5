"""The gene routes: GET /v1/genes/search?q=TEXT and GET /v1/genes/{symbol}/neighbors."""

from fastapi import HTTPException, Query

from cellvec.errors import StoreError
from cellvec.service.context import Served


def add_gene_routes(app, ctx: Served):
    gene_store = ctx.gene_store

    @app.get("/v1/genes/search")
    def gene_search(
        q: str = Query(..., min_length=1, max_length=2000),
        k: int = Query(10, ge=1, le=1000),
        model: str | None = None,
    ):
        """Genes whose texts are nearest to a free-text query."""
        res = gene_store.search(q, model=model, k=k)
        return {"query": q, "results": res.drop("text").to_dicts()}

    @app.get("/v1/genes/{symbol}/neighbors")
    def gene_neighbors(symbol: str, k: int = Query(10, ge=1, le=1000), model: str | None = None):
        """Genes nearest to a gene of the store."""
        try:
            res = gene_store.search(gene=symbol, model=model, k=k)
        except StoreError as e:
            if "is not in the" in str(e):
                raise HTTPException(404, str(e)) from None
            raise
        return {"gene": symbol, "results": res.drop("text").to_dicts()}
