"""Shared fixtures: tiny real-format gene files and gene stores, the fake embedder in place
of every model, a served atlas. The functions they are built from are in helpers.py.

Real data lives in ../shared/data; tests that need it skip with a reason when it is absent.
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every server a test starts listens on loopback: never through a proxy the machine sets.
for _key in ("NO_PROXY", "no_proxy"):
    os.environ[_key] = ",".join(filter(None, (os.environ.get(_key), "127.0.0.1,localhost")))

from cellvec.gene_store.embedders import register_embedder  # noqa: E402
from helpers import FakeEmbedder, build_tiny_atlas, tiny_store, write_gene_files  # noqa: E402

register_embedder("fake", lambda name="", **kw: FakeEmbedder(name, **kw))


@pytest.fixture(scope="session", autouse=True)
def _cache_of_the_session(tmp_path_factory):
    """Fetched bundles and cached vectors go to a folder of the session, not the user's
    cache: no test depends on HOME, or on what an earlier run left there."""
    os.environ["CELLVEC_CACHE"] = str(tmp_path_factory.mktemp("cellvec-cache"))


@pytest.fixture
def gene_files(tmp_path):
    return write_gene_files(tmp_path)


@pytest.fixture(scope="session")
def built_tiny_store(tmp_path_factory):
    """The tiny fake gene store (`helpers.tiny_store`), built once per session: read it
    only through a copy (`fake_store`, `copy_of_tiny_store`)."""
    return tiny_store(tmp_path_factory.mktemp("tiny-store"))


@pytest.fixture(scope="session")
def copy_of_tiny_store(built_tiny_store):
    """`copy_of_tiny_store(folder)`: a copy of the tiny gene store at `folder / "store"`,
    for a fixture of wider scope than `fake_store`'s."""

    def copy(folder):
        return shutil.copytree(built_tiny_store, folder / "store")

    return copy


@pytest.fixture
def fake_store(tmp_path, copy_of_tiny_store):
    """The tiny fake gene store, this test's own copy to write into."""
    return copy_of_tiny_store(tmp_path)


@pytest.fixture
def fake_models(monkeypatch):
    """The fake embedder wherever a model would be loaded by name (a server, a mapping)."""
    import cellvec.gene_store.embedders as registry
    import cellvec.gene_store.store as store_mod

    monkeypatch.setattr(registry, "get_embedder", lambda spec, **kw: FakeEmbedder())
    monkeypatch.setattr(store_mod, "get_embedder", lambda spec, **kw: FakeEmbedder())


@pytest.fixture
def served(fake_store, fake_models):
    """The fake store with atlas `tiny` (90 cells, typicality calibrated), and the fake
    embedder wherever a server would load a model."""
    build_tiny_atlas(fake_store)
    return fake_store
