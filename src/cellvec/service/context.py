"""What the service's routes share: the store, its gene table, the atlas cache and the
map batcher, built once by `create_app`."""

import threading
from dataclasses import dataclass

from cellvec.gene_store.store import GeneStore
from cellvec.service.atlases import AtlasCache
from cellvec.service.batching import Batcher
from cellvec.storage import StoreLocation


@dataclass(frozen=True)
class Served:
    """One store as served. `preloaded` is set once every atlas is loaded (at once when
    the app does not preload)."""

    store: StoreLocation
    gene_store: GeneStore
    atlases: AtlasCache
    batcher: Batcher
    preloaded: threading.Event
