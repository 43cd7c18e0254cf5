"""BERT-family models through transformers with attention-masked mean pooling.

For BioBERT (`hf:dmis-lab/biobert-v1.1`), SciBERT (`hf:allenai/scibert_scivocab_uncased`),
PubMedBERT, or any local directory with a config, tokenizer and weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cellvec.errors import EmbedderError
from cellvec.gene_store.embedders.base import Embedder, torch_device


class HFMeanPoolEmbedder(Embedder):
    batch_size = 32

    def __init__(self, name: str, *, device: str | None = None, max_length: int = 512, **_):
        self.name = name
        self.spec = f"hf:{name}"
        self.device = device
        self.max_length = max_length
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            try:
                from transformers import AutoModel, AutoTokenizer
            except ImportError as e:
                raise EmbedderError(
                    "transformers is not installed: pip install 'cellvec[embed]'."
                ) from e
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.name)
                model = AutoModel.from_pretrained(self.name)
            except (OSError, ValueError) as e:
                raise EmbedderError(
                    f"Cannot load transformers model {self.name!r} ({e}). Give a local directory "
                    "with config.json, tokenizer files and weights, or a hub name with network access."
                ) from e
            self._device = self.device or torch_device()
            self._model = model.to(self._device).eval()
            limit = getattr(model.config, "max_position_embeddings", self.max_length)
            self.max_length = min(self.max_length, int(limit))
        return self._model

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        model = self._load()
        enc = self._tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self._device)
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return pooled.float().cpu().numpy()

    def config(self) -> dict:
        return {
            "model": self.spec,
            "provider": "transformers",
            "pooling": "mean",
            "max_length": self.max_length,
        }
