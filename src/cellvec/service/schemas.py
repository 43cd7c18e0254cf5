"""Request bodies of the HTTP API (pydantic models, shown in the OpenAPI docs)."""

from __future__ import annotations

from pydantic import BaseModel, Field, SkipValidation

MAX_CELLS_PER_REQUEST = 50_000


class Cell(BaseModel):
    """One cell. `indices` and `values` are checked as whole arrays by the endpoint (numpy),
    not element by element: per-element validation cost ~0.3 s per 1,000 cells."""

    id: str = Field(..., description="Cell id, echoed back")
    indices: SkipValidation[list[int]] = Field(
        ..., description="Positions in `genes` of the non-zero values"
    )
    values: SkipValidation[list[float]] = Field(
        ..., description="Expression values (counts or log-normalised)"
    )


class MapRequest(BaseModel):
    genes: list[str] = Field(
        ..., min_length=1, description="Gene symbols (or Ensembl ids) of the columns"
    )
    cells: list[Cell] = Field(..., min_length=1, max_length=MAX_CELLS_PER_REQUEST)
    k: int | None = Field(
        None,
        ge=1,
        le=200,
        description="Neighbours in the vote (default: the atlas's, 15 unless tuned)",
    )
    min_confidence: float = Field(
        0.0, ge=0.0, le=1.0, description="Below this a cell is 'unassigned'"
    )
    min_typicality: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Below this typicality (calibrated on the reference) a cell is 'unassigned'",
    )
    min_mixing: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Below this mixing-test p-value a cell is 'unassigned' (the request's cells "
        "are judged as one query: send the whole query)",
    )
    exclude_labels: list[str] = Field(
        [], max_length=1_000, description="Labels never given (their reference cells are skipped)"
    )
    orthologs: str | None = Field(
        None,
        max_length=64 * 1024 * 1024,
        description="An ortholog table's text (CSV/TSV, see `cellvec map --orthologs`): the "
        "query's genes are matched to the atlas's species through it",
    )
    scores: bool = Field(False, description="Return per-class scores per cell")
    vectors: bool = Field(False, description="Return each cell's vector")


class SQLRequest(BaseModel):
    query: str = Field(..., min_length=1, max_length=100_000, description="One read-only SELECT")
