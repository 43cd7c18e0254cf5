"""The HTTP query service (FastAPI): map cells, list atlases, search genes, read-only SQL."""

__all__ = ["create_app"]


def __getattr__(name: str):
    # `create_app` is imported on first use, so that `cellvec serve` can size the thread
    # pools (`service.threads`) before numpy and faiss load and start theirs.
    if name == "create_app":
        from cellvec.service.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
