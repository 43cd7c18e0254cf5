"""The embedder base class: subclasses implement `embed_batch`; the base batches."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)


class Embedder:
    """Turns texts into L2-normalised float32 vectors.

    Subclasses set `spec` and implement `embed_batch(texts) -> ndarray (n, dim)`.
    `batch_size` is how many texts one `embed_batch` call receives.
    """

    spec: str = ""
    batch_size: int = 64

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def config(self) -> dict:
        """What is recorded in a table's metadata about this model."""
        return {"model": self.spec}

    def iter_batches(
        self, texts: Sequence[str], batch_size: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices, vectors) batches, longest texts grouped together to cut padding."""
        bs = batch_size or self.batch_size
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            vecs = np.asarray(self.embed_batch([texts[i] for i in idx]), dtype=np.float32)
            yield idx, normalise_rows(vecs)

    def embed(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """Embed all `texts`, returned in input order."""
        out: np.ndarray | None = None
        for idx, vecs in self.iter_batches(texts, batch_size):
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
            out[idx] = vecs
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


def torch_device() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
