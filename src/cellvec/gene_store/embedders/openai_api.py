"""OpenAI embeddings (ada-002, text-embedding-3-*) or any OpenAI-compatible server.

The key comes from the environment only (`OPENAI_API_KEY`); the server from
`base_url=` or `OPENAI_BASE_URL`. Requests stay within the API's limits (at most
2,048 inputs and ~300k tokens each, 8,191 tokens per input); the client retries
429 and 5xx with exponential backoff.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cellvec.errors import EmbedderError
from cellvec.gene_store.embedders.base import Embedder, normalise_rows

MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 250_000  # the API's cap is 300k; token counts are estimated
MAX_INPUT_CHARS = 8191 * 3  # ~3 characters per token in gene texts


class OpenAIEmbedder(Embedder):
    batch_size = 512

    def __init__(
        self,
        name: str,
        *,
        base_url: str | None = None,
        max_retries: int = 6,
        timeout: float = 60.0,
        dimensions: int | None = None,
        **_,
    ):
        self.name = name
        self.spec = f"openai:{name}"
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        self.max_retries = max_retries
        self.timeout = timeout
        self.dimensions = dimensions
        self._client = None

    def _load(self):
        if self._client is None:
            try:
                import openai
            except ImportError as e:
                raise EmbedderError(
                    "The openai client is not installed: pip install 'cellvec[openai]'."
                ) from e
            key = os.environ.get("OPENAI_API_KEY")
            if not key:
                raise EmbedderError(
                    f"{self.spec} needs an API key: set the OPENAI_API_KEY environment variable "
                    "(any non-empty value for a local OpenAI-compatible server that ignores keys)."
                )
            self._client = openai.OpenAI(
                api_key=key,
                base_url=self.base_url,
                max_retries=self.max_retries,
                timeout=self.timeout,
            )
        return self._client

    def iter_batches(self, texts, batch_size=None):
        # Split further so each request respects the input-count and token caps.
        bs = min(batch_size or self.batch_size, MAX_INPUTS)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        start = 0
        while start < len(order):
            stop, tokens = start, 0
            while stop < len(order) and stop - start < bs:
                est = min(len(texts[order[stop]]), MAX_INPUT_CHARS) // 3 + 1
                if stop > start and tokens + est > MAX_REQUEST_TOKENS:
                    break
                tokens += est
                stop += 1
            idx = order[start:stop]
            yield (
                idx,
                normalise_rows(
                    np.asarray(self.embed_batch([texts[i] for i in idx]), dtype=np.float32)
                ),
            )
            start = stop

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        import openai

        client = self._load()
        kwargs = {"dimensions": self.dimensions} if self.dimensions else {}
        try:
            resp = client.embeddings.create(
                model=self.name, input=[t[:MAX_INPUT_CHARS] for t in texts], **kwargs
            )
        except openai.AuthenticationError as e:
            raise EmbedderError(
                f"The server at {client.base_url} rejected the API key (401). Check OPENAI_API_KEY."
            ) from e
        except openai.NotFoundError as e:
            raise EmbedderError(
                f"The server at {client.base_url} has no model {self.name!r} (404)."
            ) from e
        except openai.APIConnectionError as e:
            raise EmbedderError(
                f"Cannot reach {client.base_url} ({e}). Check --base-url / OPENAI_BASE_URL."
            ) from e
        except openai.APIStatusError as e:
            raise EmbedderError(
                f"{client.base_url} answered {e.status_code} after {self.max_retries} retries: {e.message}"
            ) from e
        data = sorted(resp.data, key=lambda d: d.index)
        if len(data) != len(texts):
            raise EmbedderError(
                f"{client.base_url} returned {len(data)} vectors for {len(texts)} inputs."
            )
        return np.asarray([d.embedding for d in data], dtype=np.float32)

    def config(self) -> dict:
        cfg = {"model": self.spec, "provider": "openai"}
        if self.base_url:
            cfg["base_url"] = str(self.base_url)
        if self.dimensions:
            cfg["dimensions"] = self.dimensions
        return cfg
