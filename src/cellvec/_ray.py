"""Joining a Ray cluster: what `--ray [ADDRESS]` (or `CELLVEC_RAY_ADDRESS`, its default) means.

An address is one of:

- `True` / `"default"` (a bare `--ray`): Ray's own rules (`RAY_ADDRESS`, then the
  cluster last started on this machine); when none is running, a local one is
  started for this process, listening on 127.0.0.1 only, without a dashboard or
  usage statistics, and stopped when the process ends;
- `"local"`: always such a new local cluster;
- `"auto"`: a running cluster found as Ray finds it, else an error;
- `"HOST:PORT"` (the head node's GCS) or `"ray://HOST:10001"` (Ray Client).

Other modules call `init_ray(address)` and get the `ray` module back, connected;
a process already connected (`ray.init()` done by the caller, a test's cluster)
is used as it is. They run Ray Data inside `ordered_data(ray)`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from cellvec.errors import CellvecError

log = logging.getLogger(__name__)

DEFAULT = "default"


def ray_address(value: str | bool | None) -> str | None:
    """The address a `ray=` argument stands for: None (no Ray), `DEFAULT`, or an address."""
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT
    value = str(value).strip()
    return value or DEFAULT


def import_ray():
    """The `ray` module, or an error naming the extra that installs it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise CellvecError(
            f"Running on a Ray cluster needs Ray Data and lance-ray ({e}): "
            "pip install 'cellvec[ray]'."
        ) from e
    return ray


def start_local_cluster(num_cpus: int | None = None, **options):
    """Start a Ray cluster inside this process, reachable from this machine only.

    Ray binds its servers to the node's routable address unless it believes it runs
    on a laptop; this tells it so, so that the GCS, raylet, object manager and
    workers listen on 127.0.0.1. No dashboard, no usage statistics."""
    ray = import_ray()
    from ray._private import ray_constants

    settings = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    before = {k: os.environ.get(k) for k in settings}
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(settings)  # inherited by the cluster's processes
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time by ray's services
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            **options,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    log.info(
        "Started a local Ray cluster on 127.0.0.1 with %d CPUs",
        int(ray.cluster_resources().get("CPU", 0)),
    )
    return ray


def init_ray(address: str | bool | None = True):
    """Connect to the Ray cluster `address` names (see the module docstring); the `ray` module."""
    address = ray_address(address)
    if address is None:
        raise CellvecError("init_ray needs an address (True for a local cluster).")
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address == "local":
        return start_local_cluster()
    if address == DEFAULT:
        if os.environ.get("RAY_ADDRESS"):
            address = os.environ["RAY_ADDRESS"]
        else:
            try:
                ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
            except ConnectionError:
                return start_local_cluster()
            _log_joined(ray, "the running local cluster")
            return ray
    hint = (
        "Give the head node's HOST:PORT or ray://HOST:10001, `auto` for a cluster started "
        "on this machine with `ray start`, or a bare --ray for a local one."
    )
    _check_reachable(address, hint)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise CellvecError(f"Cannot join the Ray cluster at {address!r} ({e}). {hint}") from e
    _log_joined(ray, address)
    return ray


def _check_reachable(address: str, hint: str, timeout: float = 5.0) -> None:
    """Fail in seconds on a HOST:PORT nothing answers at (Ray itself retries for minutes)."""
    import socket

    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise CellvecError(f"Ray address {address!r} has no port. {hint}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise CellvecError(f"Nothing answers at Ray address {address!r} ({e}). {hint}") from e


def _log_joined(ray, where: str) -> None:
    res = ray.cluster_resources()
    log.info(
        "Joined Ray cluster %s: %d nodes, %d CPUs",
        where,
        len([n for n in ray.nodes() if n.get("Alive")]),
        int(res.get("CPU", 0)),
    )


def cluster_cpus(ray) -> int:
    """CPUs the connected cluster has (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _cellvec_cause(exc: BaseException) -> CellvecError | None:
    """The cellvec error a worker raised, from inside Ray's wrappers (RayTaskError, ...)."""
    from ray.exceptions import RayError

    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CellvecError) and not isinstance(e, RayError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


@contextlib.contextmanager
def ordered_data(ray):
    """Ray Data in the input's order (cell shards, store batches), without its progress
    bars (cellvec logs its own). A dataset keeps the settings in force when it was made:
    make it inside. A cellvec error raised by a worker comes out as itself, not wrapped
    in Ray's exceptions. What Ray prints meanwhile goes to stderr: a command's stdout is
    its `--json` document (a fresh-clone CI run once found Ray Data's DEBUG dumps of its
    DataContext at the head of one). Clusters cellvec joins or starts do not forward
    their workers' output either (`log_to_driver=False`; it stays in Ray's session logs)."""
    ctx = ray.data.DataContext.get_current()
    before = (
        ctx.execution_options.preserve_order,
        ctx.enable_progress_bars,
        ctx.raise_original_map_exception,
    )
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.raise_original_map_exception = True  # a worker's error travels as itself
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    except Exception as e:
        cause = _cellvec_cause(e)
        if cause is None or cause is e:
            raise
        # what a worker found wrong with the input, said as it would be without Ray
        raise type(cause)(*cause.args) from e
    finally:
        (
            ctx.execution_options.preserve_order,
            ctx.enable_progress_bars,
            ctx.raise_original_map_exception,
        ) = before
