"""cellvec: language-model gene embeddings, cell vectors and KNN mapping onto reference atlases.

The public API is imported lazily so that `import cellvec` (and `cellvec --help`)
stays fast. The one thing import does: pin numpy's and torch's numerical kernels
(`cellvec._kernels`) before either loads, so that a seed gives the same results on
any Intel machine with AVX2.
"""

from __future__ import annotations

import importlib

from cellvec import _kernels

_kernels.pin()

__version__ = "0.1.0"

_API = {
    "build_gene_store": "cellvec.gene_store.store",
    "import_vectors": "cellvec.gene_store.store",
    "GeneStore": "cellvec.gene_store.store",
    "get_embedder": "cellvec.gene_store.embedders",
    "register_embedder": "cellvec.gene_store.embedders",
    "match_genes": "cellvec.gene_store.resolve",
    "read_expression": "cellvec.cell_index.readers",
    "Recipe": "cellvec.cell_index.recipe",
    "cell_vectors": "cellvec.cell_index.vectors",
    "build_atlas": "cellvec.cell_index.build",
    "BuildOptions": "cellvec.cell_index.build",
    "Atlas": "cellvec.cell_index.atlas",
    "map_cells": "cellvec.cell_index.mapping",
    "MappingResult": "cellvec.cell_index.result",
    "MapOptions": "cellvec.cell_index.calls",
    "evaluate": "cellvec.evaluation.evaluate",
    "EvaluationPlan": "cellvec.evaluation.plan",
    "Scenarios": "cellvec.evaluation.plan",
    "EvaluationResult": "cellvec.evaluation.result",
    "explain_subtype": "cellvec.cell_index.explain",
    "connect_sql": "cellvec.sql",
    "write_report": "cellvec.report",
    "CellvecError": "cellvec.errors",
    "Store": "cellvec.storage",
    "store_location": "cellvec.storage",
    "StoreLocation": "cellvec.storage",
    "Client": "cellvec.client",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'cellvec' has no attribute {name!r}")


def __dir__():
    return __all__
