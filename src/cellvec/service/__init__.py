"""The HTTP query service (FastAPI): map cells, list atlases, search genes, read-only SQL."""

from cellvec.service.app import create_app

__all__ = ["create_app"]
