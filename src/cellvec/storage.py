"""Where a store lives: a local directory or an object-store URI, with its storage options.

Every command's `--store` is a `StoreLocation`: a local path (`store/`) or a URI
that Lance reads and writes in place (`s3://bucket/prefix`, `gs://bucket/prefix`,
`az://container/prefix`). Storage options (credentials, region, endpoint) come,
lowest priority first, from what Lance reads of the environment itself (`AWS_*`,
`GOOGLE_*`, `AZURE_*`), from `$CELLVEC_STORAGE_OPTIONS` (a JSON object) and from
the options given here (`--storage-option KEY=VALUE`). The keys are Lance's
(https://lancedb.github.io/lance/guide/object_store/): `aws_endpoint`,
`aws_region`, `allow_http`, `aws_access_key_id`, `google_service_account`,
`azure_storage_account_name`, ...

Everything in a store is a Lance table (gene tables, atlases, mappings, artifacts)
reached through one `Store`, whose connection comes from `StoreLocation.connect()`, so
one set of options reaches every read and write, and Lance's commits (conditional PUTs
on S3) keep concurrent writers from losing each other's data. Each kind of table has
its own module above this one: `gene_store.GeneStore` reads the gene tables,
`cell_index` the atlases, mappings and artifacts. `translate_errors` turns
what the object store answers into a `StoreError` naming the store, the problem
and the fix.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cellvec.errors import StoreError

OPTIONS_ENV = "CELLVEC_STORAGE_OPTIONS"
# Every table's schema metadata keeps what cellvec records of it (JSON) under this key.
META_KEY = b"cellvec"
# Schemes Lance can open, with what the bucket part of the URI names.
SCHEMES = {
    "s3": "bucket",
    "s3+ddb": "bucket",
    "gs": "bucket",
    "az": "container",
    "abfss": "container",
}
EXAMPLES = "a local directory, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX or az://CONTAINER/PREFIX"


def uri_scheme(uri: str) -> str | None:
    """The scheme of `uri` (`s3`, `https`, ..., lower-cased); None for a plain path."""
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    return m.group(1).lower() if m else None


@dataclass(frozen=True)
class StoreLocation:
    """A store: `uri` (a local path, or scheme://bucket/prefix) and its storage options."""

    uri: str
    storage_options: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return self.uri

    @property
    def scheme(self) -> str | None:
        """`s3`, `gs`, `az`, ...; None for a local directory."""
        return uri_scheme(self.uri)

    @property
    def is_local(self) -> bool:
        return self.scheme is None

    @property
    def path(self) -> Path:
        """The local directory (only for local stores)."""
        if not self.is_local:
            raise StoreError(f"The store {self.uri} is not a local directory.")
        return Path(self.uri)

    def options(self) -> dict[str, str]:
        return dict(self.storage_options)

    @property
    def endpoint(self) -> str | None:
        """The S3-compatible endpoint named by the options or the environment (None: AWS)."""
        opts = self.options()
        return (
            opts.get("aws_endpoint")
            or opts.get("endpoint")
            or opts.get("aws_endpoint_url")
            or os.environ.get("AWS_ENDPOINT_URL")
            or os.environ.get("AWS_ENDPOINT")
        )

    def table_uri(self, table: str) -> str:
        """Where LanceDB keeps table `table` (for `lance.dataset(uri, storage_options=...)`)."""
        return f"{self.uri.rstrip('/')}/{table}.lance"

    def require_folder(self) -> None:
        """A local store is a folder: a path that is a file is refused by name."""
        if self.is_local and self.path.exists() and not self.path.is_dir():
            raise StoreError(
                f"{self.path} is a file, not a store folder: give --store the folder that "
                "holds the store (or a new one, which `cellvec genes build` makes)."
            )

    def connect(self, *, create: bool = False):
        """A LanceDB connection to the store; `create` makes a local directory if missing."""
        import lancedb

        self.require_folder()
        if self.is_local and create:
            self.path.mkdir(parents=True, exist_ok=True)
        with translate_errors(self):
            return lancedb.connect(self.uri, storage_options=self.options() or None)

    def to_env(self) -> dict[str, str]:
        """Environment variables that make `store_location()` give this location back in
        another process (server workers): the URI is returned, the options go in
        `$CELLVEC_STORAGE_OPTIONS`."""
        return {OPTIONS_ENV: json.dumps(self.options())} if self.storage_options else {}


def parse_options(pairs: Iterator[str] | list[str] | tuple[str, ...]) -> dict[str, str]:
    """`KEY=VALUE` strings (the `--storage-option` flag) as a dict; keys are lower-cased,
    as Lance expects them."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise StoreError(
                f"Storage option {pair!r} is not KEY=VALUE: write e.g. "
                "--storage-option aws_region=eu-west-1."
            )
        out[key.strip().lower()] = value
    return out


def env_options() -> dict[str, str]:
    """Storage options from `$CELLVEC_STORAGE_OPTIONS` (a JSON object of strings)."""
    raw = os.environ.get(OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StoreError(
            f"${OPTIONS_ENV} is not JSON ({e}): set it to an object, e.g. "
            '\'{"aws_region": "eu-west-1"}\'.'
        ) from e
    if not isinstance(opts, dict):
        raise StoreError(f"${OPTIONS_ENV} must be a JSON object of option names to values.")
    return {str(k).lower(): str(v) for k, v in opts.items()}


def env_bytes(name: str, default: int) -> int:
    """A size from environment variable `name` (bytes, or with a K, M, G or T suffix:
    `20G`), else `default`."""
    raw = os.environ.get(name, "").strip().upper()
    if not raw:
        return default
    text = raw[:-1] if raw.endswith("B") else raw
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError as e:
        raise StoreError(f"${name}={raw!r}: give bytes, e.g. 20000000000 or 20G.") from e


def store_location(
    store: str | os.PathLike | StoreLocation | Store,
    storage_options: Mapping[str, str] | None = None,
) -> StoreLocation:
    """The location of `store` (a path, a URI or a location) with its storage options:
    `$CELLVEC_STORAGE_OPTIONS`, then those `store` already carries, then `storage_options`."""
    if isinstance(store, Store):
        store = store.location
    if isinstance(store, StoreLocation):
        base, uri = store.options(), store.uri
    else:
        base, uri = {}, os.fspath(store)
    opts = {
        **env_options(),
        **base,
        **{k.lower(): str(v) for k, v in (storage_options or {}).items()},
    }
    loc = StoreLocation(uri, tuple(sorted(opts.items())))
    scheme = loc.scheme
    if scheme is None:
        if not uri:
            raise StoreError(f"An empty store path: give {EXAMPLES}.")
        return loc
    if scheme == "file":
        return StoreLocation(uri[len("file://") :], loc.storage_options)
    if scheme not in SCHEMES:
        raise StoreError(
            f"Store {uri!r}: unknown scheme {scheme!r}. Give {EXAMPLES} "
            f"(schemes: {', '.join(SCHEMES)})."
        )
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise StoreError(
            f"Store {uri!r} names no {SCHEMES[scheme]}: write {scheme}://{SCHEMES[scheme].upper()}/PREFIX."
        )
    return StoreLocation(uri.rstrip("/"), loc.storage_options)


# No answer from an object store (Lance's and pyarrow's words): network, DNS, timeout.
_UNREACHABLE = (
    r"tcp connect error|Connection refused|dns error|error sending request|"
    r"Connect, ConnectError|timed out|NETWORK_CONNECTION|Could not connect|Could not resolve"
)
# What object stores answer, as (pattern in Lance's message, problem, fix).
_PROBLEMS = [
    (
        r"NoSuchBucket|bucket does not exist|ContainerNotFound",
        "the bucket does not exist",
        "create it (e.g. `aws s3 mb s3://BUCKET`) or correct the URI",
    ),
    (
        r"Failed to get AWS credentials|NoCredentialProviders|no credentials|MissingCredentials",
        "no AWS credentials were found",
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
        "--storage-option aws_access_key_id=... --storage-option aws_secret_access_key=...",
    ),
    (
        r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|status: 403|"
        r"AuthorizationFailure|AuthenticationFailed",
        "access was denied (wrong credentials, or no permission on this prefix)",
        "check the credentials in the environment or --storage-option, and the bucket's policy",
    ),
    (
        r"computeMetadata|google_service_account|GOOGLE_APPLICATION_CREDENTIALS|TokenRequest",
        "no Google Cloud credentials were found",
        "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or pass "
        "--storage-option google_service_account=PATH",
    ),
    (
        r"no Azure account name|storage account",
        "no Azure storage account was named",
        "set AZURE_STORAGE_ACCOUNT_NAME (and AZURE_STORAGE_ACCOUNT_KEY), or pass "
        "--storage-option azure_storage_account_name=...",
    ),
    (
        _UNREACHABLE,
        "the object store could not be reached",
        "check the endpoint (AWS_ENDPOINT_URL or --storage-option aws_endpoint=URL; "
        "allow_http=true for a plain-http server) and the network",
    ),
    (
        r"permission denied",
        "this user may not write there (permission denied)",
        "write into a store folder of yours, or ask the store's owner for write access",
    ),
    (
        r"URL did not match any known pattern|No object store provider",
        "the URI is not one Lance can open",
        f"give {EXAMPLES}",
    ),
]


def describe_error(loc: StoreLocation, err: BaseException) -> StoreError | None:
    """A `StoreError` for an object-store failure Lance raised, or None if `err` is not one."""
    text = str(err)
    for pattern, problem, fix in _PROBLEMS:
        if re.search(pattern, text, flags=re.IGNORECASE):
            where = "" if loc.is_local else _endpoint_note(loc)
            return StoreError(f"Store {loc.uri}: {problem}{where}. Fix: {fix}.")
    return None


def is_unreachable(err: BaseException) -> bool:
    """Whether `err` says the store could not be reached (network, DNS, timeout), rather
    than that it answered (no such key, access denied, ...)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return re.search(_UNREACHABLE, str(err), flags=re.IGNORECASE) is not None


def _endpoint_note(loc: StoreLocation) -> str:
    endpoint = loc.endpoint
    return f" (endpoint {endpoint})" if endpoint and loc.scheme in ("s3", "s3+ddb") else ""


@contextmanager
def translate_errors(loc: StoreLocation):
    """Re-raise object-store failures (bucket, credentials, endpoint) as `StoreError`s."""
    try:
        yield
    except StoreError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        mapped = describe_error(loc, e)
        if mapped is None:
            raise
        raise mapped from e


class Store:
    """A cellvec store: every Lance table under one location, through one LanceDB
    connection (opened on first use). What the tables hold is read by the modules that
    own them: `GeneStore(store)` the gene tables, `cell_index` the atlases, mappings and
    artifacts.

    `Store(path)` refuses a location with nothing there, naming the command that makes
    one; `create=True` (writers) accepts it."""

    def __init__(self, where: str | os.PathLike | StoreLocation, *, create: bool = False):
        self.location = store_location(where)
        self.path = self.location.uri  # what messages name: the directory or the URI
        self._db = None
        self.location.require_folder()
        if not create and not self.exists():
            raise StoreError(
                f"No gene store at {self.path}: build one with `cellvec genes build --store {self.path} ...`"
                + ("." if self.location.is_local else ", or check the URI (nothing is there).")
            )

    @classmethod
    def of(cls, store: Store | str | os.PathLike | StoreLocation, *, create: bool = False) -> Store:
        """`store` itself when it is an open `Store` (its connection is reused), else one
        opened on it."""
        return store if isinstance(store, Store) else cls(store, create=create)

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    def __str__(self) -> str:
        return self.path

    def exists(self) -> bool:
        """A local directory that exists, or a URI with at least one table under it."""
        if self.location.is_local:
            return self.location.path.exists()
        return bool(self.table_names())

    @property
    def db(self):
        """The LanceDB connection."""
        if self._db is None:
            self._db = self.location.connect(create=True)
        return self._db

    def table_names(self) -> list[str]:
        with translate_errors(self.location):
            return list_table_names(self.db)

    def open_table(self, name: str):
        """Table `name`, or None when the store has none. Opened first, listed only when
        that fails: on a bucket a listing is one more request per open (the service checks
        each atlas's version once a second). A name LanceDB refuses (`a b`) is not listed."""
        with translate_errors(self.location):
            try:
                return self.db.open_table(name)
            except (ValueError, RuntimeError, OSError):
                if name in self.table_names():
                    raise
        return None

    def replace_table(self, name: str, data):
        """`replace_table` on this store's connection."""
        return replace_table(self.db, name, data)


def list_table_names(db) -> list[str]:
    """Every table of a LanceDB connection, following pages."""
    names, token = [], None
    while True:
        resp = db.list_tables(page_token=token)
        names.extend(resp.tables)
        token = resp.page_token
        if not token:
            return sorted(names)


def replace_table(db, name: str, data):
    """Write `data` as table `name` in one commit: created, or overwritten when it exists.

    Two writers replacing one table at once: Lance commits one and refuses the other
    (on S3 through a conditional PUT), which is reported as a `StoreError`; the table is
    never a mix of the two. (Two creating a new table at once may instead both be
    committed, one after the other: the last one wins.)"""
    try:
        return db.create_table(
            name, data, mode="overwrite" if name in list_table_names(db) else "create"
        )
    except (ValueError, RuntimeError, OSError) as e:
        mapped = describe_error(store_location(db.uri), e)
        if mapped is not None:  # permission denied, no bucket, credentials, ...
            raise mapped from e
        if not re.search(r"already exists|commit conflict|preempted by concurrent", str(e), re.I):
            raise
        raise StoreError(
            f"Table {name} in {db.uri} was written by another writer at the same moment, so "
            "this write was not committed (the other one was). Run the command again if "
            "this version should replace it."
        ) from e


def read_meta(tbl) -> dict:
    """What a table remembers of how it was made (its schema metadata under `META_KEY`)."""
    md = tbl.schema.metadata or {}
    return json.loads(md[META_KEY]) if META_KEY in md else {}
