"""Any sentence-transformers model, by hub name or local path."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellvec.errors import EmbedderError
from cellvec.gene_store.embedders.base import Embedder, torch_device


class SentenceTransformerEmbedder(Embedder):
    batch_size = 64

    def __init__(self, name: str, *, device: str | None = None, **_):
        self.name = name
        self.spec = f"st:{name}"
        self.device = device
        self._model = None

    def _load(self):
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as e:
                raise EmbedderError(
                    "sentence-transformers is not installed: pip install 'cellvec[embed]'."
                ) from e
            try:
                self._model = SentenceTransformer(self.name, device=self.device or torch_device())
            except (OSError, ValueError) as e:
                raise EmbedderError(
                    f"Cannot load sentence-transformers model {self.name!r} ({e}). Give a local "
                    "directory, or a hub name with network access (HF_HUB_OFFLINE unset)."
                ) from e
        return self._model

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        return model.encode(
            list(texts),
            batch_size=len(texts),
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )

    def config(self) -> dict:
        cfg = {"model": self.spec, "provider": "sentence-transformers"}
        if self._model is not None:
            cfg["max_seq_length"] = int(self._model.max_seq_length)
        return cfg
