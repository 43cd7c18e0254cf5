"""The recipe: everything that gives a cell vector its meaning.

An atlas stores its recipe in its table metadata; a query is embedded by
re-applying exactly that recipe, and a query made otherwise is refused with a
message that lists what differs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from numbers import Integral

from cellvec.errors import CellvecError, RecipeMismatchError

# The most neighbours a vote may use: an atlas's default (`atlas build -k`, a bundle's), a
# mapping's and an evaluation's `k` alike. Each query cell's search and vote grow with k.
MAX_K = 1000


def is_count(value, most: int) -> bool:
    """Whether `value` is a whole number from 1 to `most` (not a bool, not a float): a k,
    or a search setting read from a file."""
    return isinstance(value, Integral) and not isinstance(value, bool) and 1 <= value <= most


# How a cell's top genes are weighted, from its log-normalised expression v: value (v itself),
# log1p (of v), rank, softmax (exp v = 1 + CP10k: the expression) and sqrt (its square root)
WEIGHTINGS = ("value", "log1p", "rank", "softmax", "sqrt")
BACKGROUNDS = ("none", "center", "whiten")
REFINES = ("none", "supcon", "simclr")
# Gene programs left out of the cell vectors (`gene_store.programs`, which finds them by
# the store's NCBI names); an atlas recipe without the field predates it: "none".
SKIP_GENES = ("none", "ribosomal")
# How mapping reads the calls off an atlas (not part of the vectors' recipe, recorded beside
# it): the k nearest cells' vote or the class centroids. A reference whose median class has
# fewer than FEW_CELLS cells chooses between them at build (`tune.choose_readout`).
READOUTS = ("knn", "centroid")
FEW_CELLS = 20
RECIPE_VERSION = 2  # 2: gene adapter, reference-mean centring, fixed-length refinement
# What fitting an atlas sets from its store and its fit, not chosen by anyone (`Recipe.choices`)
FITTED = ("dimension", "gene_table_hash", "background_hash", "head_hash", "prior_hash", "version")


@dataclass(frozen=True)
class Recipe:
    """How cells become vectors.

    model: gene-store model spec; store_table_version: the gene table version used;
    dimension: gene vector size; top_genes: N most-expressed genes per cell;
    weighting: value | log1p | rank | softmax | sqrt (`WEIGHTINGS`); input: the expression the top genes
    are read from; background: none | center | whiten (fitted on the reference's
    gene vectors, `background_hash` names the fitted transform); center: subtract
    the reference's mean cell vector (the background every cell shares) before
    normalising; skip_genes: none | ribosomal, a gene program left out of every
    cell's top genes (`gene_store.programs`: the cytosolic ribosomal proteins, whose
    level follows species and protocol more than cell type); refine: none | supcon |
    simclr; adapt_genes: refinement also learns per-gene gates and corrections of the
    gene vectors; `head_hash` names the arrays fitted on the reference cells (centre,
    gene gates and corrections, head); `prior_hash` names the pre-trained prior the
    refinement started from (`cell_index.prior`; None: the text); normalise: l2.
    """

    model: str = "minilm"
    dimension: int = 384
    top_genes: int = 1000
    weighting: str = "value"
    input: str = "log-normalised"
    background: str = "whiten"
    background_hash: str | None = None
    center: bool = True
    skip_genes: str = "ribosomal"
    refine: str = "supcon"
    adapt_genes: bool = True
    head_hash: str | None = None
    prior_hash: str | None = None
    normalise: str = "l2"
    gene_table_hash: str | None = None
    version: int = RECIPE_VERSION

    def __post_init__(self):
        for name, allowed in (
            ("weighting", WEIGHTINGS),
            ("background", BACKGROUNDS),
            ("refine", REFINES),
            ("skip_genes", SKIP_GENES),
        ):
            if getattr(self, name) not in allowed:
                raise CellvecError(
                    f"Unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}."
                )
        if self.top_genes < 1:
            raise CellvecError(f"top_genes must be at least 1, got {self.top_genes}.")

    def to_dict(self) -> dict:
        return asdict(self)

    def choices(self) -> Recipe:
        """This recipe as chosen, without what a fit set (`FITTED` back to their defaults):
        fitting it again, e.g. in cross-validation folds, makes vectors the same way."""
        return replace(self, **{f: getattr(Recipe, f) for f in FITTED})

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        known = {f.name for f in fields(cls)}
        # atlases built before genes could be skipped kept every gene
        return cls(**{"skip_genes": "none", **{k: v for k, v in d.items() if k in known}})

    def differences(self, other: Recipe) -> list[str]:
        return [
            f"{f.name}: atlas {getattr(self, f.name)!r} vs query {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]

    def require_same(self, other: Recipe, atlas: str) -> None:
        diff = self.differences(other)
        if diff:
            raise RecipeMismatchError(
                f"The query would be embedded differently from atlas {atlas!r}: {'; '.join(diff)}. "
                "Map with the atlas's own settings (leave them unset) or rebuild the atlas."
            )
