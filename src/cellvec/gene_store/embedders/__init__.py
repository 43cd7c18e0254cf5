"""Embedding models, registered by name.

A spec names a model: `minilm` (offline default), `st:NAME_OR_PATH`
(sentence-transformers), `hf:NAME_OR_PATH` (transformers, mean pooling: BioBERT,
SciBERT, PubMedBERT), `openai:MODEL` (OpenAI or any OpenAI-compatible server).
Each provider lives in its own module and registers a factory under its prefix;
`register_embedder` adds more (tests register a deterministic fake).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cellvec.errors import EmbedderError
from cellvec.gene_store.embedders.base import Embedder

_REGISTRY: dict[str, Callable[..., Embedder]] = {}


def register_embedder(prefix: str, factory: Callable[..., Embedder]) -> None:
    """Register `factory(name, **options) -> Embedder` under `prefix` (e.g. 'st')."""
    _REGISTRY[prefix] = factory


def available_embedders() -> list[str]:
    """The spec forms that `get_embedder` accepts."""
    _register_builtins()
    return [p if p == "minilm" else f"{p}:NAME" for p in _REGISTRY]


def get_embedder(spec: str, **options) -> Embedder:
    """An embedder for `spec` (see module docstring); the model loads on first use."""
    _register_builtins()
    prefix, _, name = spec.partition(":")
    factory = _REGISTRY.get(prefix)
    if factory is None or (prefix != "minilm" and not name and prefix in ("st", "hf", "openai")):
        raise EmbedderError(
            f"Unknown embedding model {spec!r}. Known: {', '.join(available_embedders())} "
            "(e.g. minilm, st:all-mpnet-base-v2, hf:dmis-lab/biobert-v1.1, "
            "openai:text-embedding-3-small)."
        )
    return factory(name, **options)


def model_slug(spec: str) -> str:
    """A table-name-safe form of a model spec: 'st:/x/all-mpnet' -> 'st_all_mpnet'."""
    prefix, _, name = spec.partition(":")
    if "/" in name or "\\" in name:
        name = re.split(r"[/\\]", name.rstrip("/\\"))[-1]
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", f"{prefix}_{name}" if name else prefix).strip("_").lower()
    return slug or "model"


_BUILTINS_DONE = False


def _register_builtins() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    from cellvec.gene_store.embedders import hf, minilm, openai_api, st

    _REGISTRY.setdefault("minilm", minilm.MiniLMEmbedder)
    _REGISTRY.setdefault("st", st.SentenceTransformerEmbedder)
    _REGISTRY.setdefault("hf", hf.HFMeanPoolEmbedder)
    _REGISTRY.setdefault("openai", openai_api.OpenAIEmbedder)


__all__ = ["Embedder", "available_embedders", "get_embedder", "model_slug", "register_embedder"]
