"""Atlas bundles from anywhere: a local folder, https:// or s3://, fetched once into a
cache and verified before anything in them is opened.

A bundle (`cellvec atlas export`) is a folder that is itself a small LanceDB store (the
atlas's table, its fitted artifacts, the gene table it needs) plus `card.json` and
`manifest.json`. The manifest lists every other file with its size and sha256.

A bundle from elsewhere is untrusted, like an upload (`cellvec.untrusted`):

- the manifest is read first (at most `MAX_MANIFEST_BYTES`), and every path in it must
  be relative, in plain POSIX form, inside the bundle (no `..`, no absolute path, no
  backslash);
- each file is streamed into the cache with its sha256 computed on the way and its size
  held to what the manifest says; a file in a local bundle that is a symlink (or sits
  under one) is refused, and a copy ends up with exactly the listed files, so Lance
  cannot be pointed at a table version that was never checksummed;
- after the checksums, the Lance tables are checked to read only listed files of their
  own folder (no base paths, as a shallow clone has). The artifacts (npz bytes) are
  checked where they are decoded, in `cell_index.artifacts` (plain numeric arrays, no
  pickled objects, sizes budgeted before decoding). No HDF5 is ever read from a bundle.

Every failure is a `StoreError` naming the bundle and the part that failed. A verified
copy lives in `$CELLVEC_CACHE/bundles/<manifest sha256>/` (default: the user's cache
folder, `~/.cache/cellvec`), so a bundle is fetched once, whatever URL it came from;
`$CELLVEC_CACHE/sources/` remembers which copy a URL gave last, for offline use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cellvec._files import replacing
from cellvec._progress import progress
from cellvec.errors import CellvecError, StoreError
from cellvec.storage import (
    StoreLocation,
    env_bytes,
    is_unreachable,
    store_location,
    uri_scheme,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CARD = "card.json"
FORMAT = "cellvec-atlas-bundle"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_FILES = 100_000
# What a bundle's Lance tables may decode to, as a multiple of the bytes fetched (plus
# `TABLE_SLACK_BYTES`): Lance's own compression gives 1-3.5x on exported atlases (top
# genes and weights), but 1,400x on a column repeating one 10 KB string, and a table
# written with zstd named in its field metadata decoded 11,000x. Checked
# `TABLE_CHECK_ROWS` rows at a time (`check_tables`): one row is never counted before
# it is decoded.
MAX_TABLE_EXPANSION = 16
REFETCH = "Export it again with `cellvec atlas export`, or fetch it again from its source."
TABLE_SLACK_BYTES = 64 * 2**20
TABLE_CHECK_ROWS = 64
# What a bundle may hold in all, checked before anything is downloaded: 20 GiB, or
# $CELLVEC_MAX_BUNDLE_BYTES (bytes; K, M, G, T suffixes).
MAX_BUNDLE_BYTES = 20 * 2**30
MAX_BUNDLE_ENV = "CELLVEC_MAX_BUNDLE_BYTES"
CACHE_ENV = "CELLVEC_CACHE"
_VERIFIED = ".verified"  # written last in a cached copy: its checks all passed
_CHUNK = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9_]{1,200}")  # an atlas name (cell_index.table.is_atlas_name)
_REMOTE = ("http", "https", "s3")


def cache_dir() -> Path:
    """`$CELLVEC_CACHE`, else `$XDG_CACHE_HOME/cellvec`, else `~/.cache/cellvec` (not created
    here: nothing happens until a bundle is fetched)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cellvec"


def is_bundle_ref(ref: str) -> bool:
    """Whether `--atlas REF` names a bundle (a URL, or a local folder with a manifest) rather
    than an atlas in a store (letters, digits and underscores)."""
    ref = str(ref)
    if uri_scheme(ref) is not None:
        return True
    return _NAME.fullmatch(ref) is None or (Path(ref) / MANIFEST).is_file()


def resolve_atlas(
    store: str | os.PathLike | StoreLocation | None, atlas: str
) -> tuple[StoreLocation, str]:
    """(the store, the atlas name) that `--store STORE --atlas ATLAS` mean. With a store,
    ATLAS is an atlas of it; without one, ATLAS is a bundle (a folder, https://... or
    s3://...), fetched and verified into the cache once, whose copy is the store."""
    atlas = os.fspath(atlas)
    if store is not None:
        if _NAME.fullmatch(atlas) is None and is_bundle_ref(atlas):
            raise CellvecError(
                f"--atlas {atlas} is a bundle, not an atlas of a store: leave out --store."
            )
        return store_location(store), atlas
    if not is_bundle_ref(atlas):
        raise CellvecError(
            f"Atlas {atlas!r} is a name, not a bundle: give the store it is in (--store), or a "
            "bundle (a folder `cellvec atlas export` wrote, https://... or s3://...)."
        )
    bundle = fetch_bundle(atlas)
    return store_location(bundle.path), bundle.atlas


@dataclass(frozen=True)
class Bundle:
    """A verified bundle in the cache: `path` is a LanceDB store holding atlas `atlas`."""

    path: Path
    manifest: dict
    source: str

    @property
    def atlas(self) -> str:
        return self.manifest["atlas"]

    @property
    def manifest_sha256(self) -> str:
        return self.path.name

    def card(self) -> dict:
        return json.loads((self.path / CARD).read_text()) if (self.path / CARD).exists() else {}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(
    folder: Path, *, atlas: str, model: str, extra: dict | None = None
) -> tuple[dict, str]:
    """List every file under `folder` (sizes and sha256) in `folder/manifest.json`; returns
    the manifest and its own sha256 (what names the bundle's copies in caches)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            raise StoreError(f"{p} is a symlink; a bundle holds plain files only.")
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            files[rel] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "atlas": atlas,
        "model": model,
        **(extra or {}),
        "files": files,
    }
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    (folder / MANIFEST).write_bytes(data)
    return manifest, hashlib.sha256(data).hexdigest()


def check_manifest(data: bytes, where: str) -> dict:
    """The manifest of bundle `where`, refused unless every path in it stays in the bundle."""
    try:
        m = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: not JSON, or an integer of more digits than Python converts;
        # RecursionError: arrays nested thousands deep
        raise StoreError(
            f"Bundle {where}: {MANIFEST} is not readable JSON ({type(e).__name__}: {str(e)[:200]}). "
            f"{REFETCH}"
        ) from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(
            f"Bundle {where}: {MANIFEST} is not a cellvec atlas bundle's (format "
            f"{m.get('format') if isinstance(m, dict) else None!r}); make one with "
            "`cellvec atlas export`."
        )
    if m.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"Bundle {where} has format version {m.get('format_version')!r}; this cellvec "
            f"reads version {FORMAT_VERSION}. Upgrade cellvec or re-export the bundle."
        )
    if not isinstance(m.get("atlas"), str) or not _NAME.fullmatch(m["atlas"]):
        raise StoreError(f"Bundle {where}: {MANIFEST} names no valid atlas ({m.get('atlas')!r}).")
    files = m.get("files")
    if not isinstance(files, dict) or not files or len(files) > MAX_FILES:
        raise StoreError(f"Bundle {where}: {MANIFEST} lists no files (or too many).")
    for rel, info in files.items():
        _check_path(rel, where)
        ok = (
            isinstance(info, dict)
            and isinstance(info.get("bytes"), int)
            and info["bytes"] >= 0
            and isinstance(info.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", info["sha256"]) is not None
        )
        if not ok:
            raise StoreError(f"Bundle {where}: {MANIFEST} entry {rel!r} lacks a size or sha256.")
    folders = {"/".join(rel.split("/")[:i]) for rel in files for i in range(1, rel.count("/") + 1)}
    clash = sorted(folders & set(files))
    if clash:
        raise StoreError(
            f"Bundle {where}: {MANIFEST} lists part {clash[0]} both as a file and as a folder "
            f"of other parts; the bundle was refused. {REFETCH}"
        )
    return m


def _check_path(rel, where: str) -> None:
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    bad = (
        p is None
        or not rel
        or "\\" in rel
        or "\x00" in rel
        or p.is_absolute()
        or re.match(r"^[A-Za-z]:", rel) is not None
        or any(part in ("", ".", "..") for part in rel.split("/"))
        or rel in (MANIFEST, _VERIFIED)
    )
    if bad:
        raise StoreError(
            f"Bundle {where}: {MANIFEST} lists the path {rel!r}, which would leave the bundle's "
            f"folder (paths must be relative, without '..'); the bundle was refused. {REFETCH}"
        )


# -- sources -----------------------------------------------------------------
class _Local:
    """A bundle folder on this machine, named by its absolute path; never offline."""

    def __init__(self, root: Path):
        self.root = root.resolve()
        self.ref = str(self.root)

    def unreachable(self, err: BaseException) -> bool:
        return False

    def open(self, rel: str):
        path = self.root
        for part in rel.split("/"):
            path = path / part
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"{path} is missing") from None
            if stat.S_ISLNK(st.st_mode):
                raise StoreError(
                    f"Bundle {self.root}: {rel} is (or sits under) a symlink; a bundle holds "
                    "plain files only, so it was refused."
                )
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"Bundle {self.root}: {rel} is not a plain file.")
        return open(path, "rb")


class _Http:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.ref = url

    def unreachable(self, err: BaseException) -> bool:
        """No answer (refused, DNS, timeout); an answer such as 404 or 403 is not."""
        import socket
        import urllib.error

        if isinstance(err, urllib.error.HTTPError):  # the server answered
            return False
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        return isinstance(reason, (socket.gaierror, ConnectionError, TimeoutError))

    def open(self, rel: str):
        import urllib.parse
        import urllib.request

        url = f"{self.url}/{urllib.parse.quote(rel)}"
        req = urllib.request.Request(url, headers={"User-Agent": "cellvec"})
        return _opener().open(req, timeout=60)


@functools.cache
def _opener():
    """urllib's opener (one per process), following redirects to http(s) only and never from https down to
    http: a bundle's server could otherwise send the fetch to ftp:// (urllib's default
    follows it) or strip its TLS. The checksums would still refuse altered parts; the
    manifest is what names them."""
    import urllib.parse
    import urllib.request

    class Redirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            old = urllib.parse.urlsplit(req.full_url).scheme
            new = urllib.parse.urlsplit(newurl).scheme
            if new not in ("http", "https") or (old, new) == ("https", "http"):
                raise StoreError(
                    f"Bundle {req.full_url}: the server redirected to {newurl[:200]}; only "
                    "redirects to http(s), and never from https to http, are followed. Use "
                    "the bundle's final https:// URL."
                )
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(Redirects)


class _S3:
    """A bundle in a bucket, read with pyarrow (the store's options: `cellvec.storage`)."""

    def __init__(self, loc: StoreLocation):
        import pyarrow.fs as pafs

        self.ref = loc.uri
        self.prefix = loc.uri.split("://", 1)[1]
        options = loc.options()
        kw = {}
        if loc.endpoint:
            scheme, _, host = loc.endpoint.partition("://")
            kw.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        if options.get("aws_access_key_id"):
            kw.update(
                access_key=options["aws_access_key_id"],
                secret_key=options.get("aws_secret_access_key"),
                session_token=options.get("aws_session_token"),
            )
        region = options.get("aws_region") or options.get("region")
        if region:
            kw["region"] = region
        self.fs = pafs.S3FileSystem(**kw)

    def open(self, rel: str):
        return self.fs.open_input_stream(f"{self.prefix}/{rel}")

    def unreachable(self, err: BaseException) -> bool:
        return is_unreachable(err)


def _source(ref: str, storage_options: dict | None):
    """Where the files of bundle `ref` are read from: a folder (`file://` too, as a store
    path), a web server, or a bucket with the store's options (`store_location`)."""
    scheme = uri_scheme(ref)
    if scheme in ("http", "https"):
        return _Http(ref)
    if scheme not in (None, "file", "s3"):
        raise StoreError(
            f"Bundle {ref}: unknown scheme {scheme!r}; give a local folder, https://HOST/PATH "
            "or s3://BUCKET/PATH."
        )
    loc = store_location(ref, storage_options)
    return _Local(loc.path) if loc.is_local else _S3(loc)


def _read_manifest(src, ref: str) -> bytes:
    with src.open(MANIFEST) as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise StoreError(
            f"Bundle {ref}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES // 2**20} MiB."
        )
    return data


# -- fetching ------------------------------------------------------------------
def fetch_bundle(
    ref: str | os.PathLike,
    *,
    cache: str | os.PathLike | None = None,
    storage_options: dict | None = None,
) -> Bundle:
    """The bundle at `ref` (a local folder, https://... or s3://...), as a verified copy in
    the cache: fetched and checked the first time, reused after that. When a URL cannot be
    reached (no answer: network, DNS, timeout; not an answer such as 404), the copy it
    gave last is used (offline), with a warning. A local folder is named by its absolute
    path and never falls back: it is there or it is an error."""
    src = _source(os.fspath(ref), storage_options)
    ref = src.ref
    root = Path(cache).expanduser() if cache else cache_dir()
    remembered = root / "sources" / f"{hashlib.sha256(ref.encode()).hexdigest()[:24]}.json"
    try:
        data = _read_manifest(src, ref)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 (URLError, OSError, pyarrow's errors)
        cached = _remembered(root, remembered) if src.unreachable(e) else None
        if cached is not None:
            log.warning("Bundle %s could not be reached (%s); using the copy in %s", ref, e, cached)
            return _load_cached(cached, ref)
        raise StoreError(
            f"Bundle {ref}: its {MANIFEST} could not be read ({e}). Check the URL or path (a "
            "bundle is the folder `cellvec atlas export --out` wrote), and for s3:// the "
            "credentials and endpoint (AWS_* or $CELLVEC_STORAGE_OPTIONS)."
        ) from e
    manifest = check_manifest(data, ref)
    digest = hashlib.sha256(data).hexdigest()
    final = root / "bundles" / digest
    if not (final / _VERIFIED).exists():
        _download(src, ref, manifest, data, final)
    else:
        _check_copy(final, manifest, ref)
        log.info("Bundle %s: cached copy %s (already verified)", ref, final)
    if not isinstance(src, _Local):  # for offline use
        with replacing(remembered) as tmp:
            tmp.write_text(json.dumps({"ref": ref, "manifest_sha256": digest}))
    return Bundle(final, manifest, ref)


def _remembered(root: Path, remembered: Path) -> Path | None:
    try:
        digest = json.loads(remembered.read_text())["manifest_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = root / "bundles" / str(digest)
    return (
        path if re.fullmatch(r"[0-9a-f]{64}", str(digest)) and (path / _VERIFIED).exists() else None
    )


def _load_cached(path: Path, ref: str) -> Bundle:
    manifest = check_manifest((path / MANIFEST).read_bytes(), ref)
    _check_copy(path, manifest, ref)
    return Bundle(path, manifest, ref)


def _check_copy(path: Path, manifest: dict, ref: str) -> None:
    """A cached copy holds exactly the files its manifest lists, at their sizes: a file
    put there since it was verified (a stray `_versions/N.manifest` would be the table
    version Lance opens) or one cut short is refused, not trusted on `.verified` alone."""
    files = manifest["files"]
    found = set()
    for folder, dirs, names in os.walk(path):
        for name in dirs + names:
            p = Path(folder) / name
            rel = p.relative_to(path).as_posix()
            if p.is_symlink():
                problem = f"{rel} is a symlink"
            elif p.is_dir() or rel in (MANIFEST, _VERIFIED):
                continue
            elif rel not in files:
                problem = f"it holds {rel}, which {MANIFEST} does not list"
            elif p.stat().st_size != files[rel]["bytes"]:
                problem = f"{rel} is not the size {MANIFEST} says"
            else:
                found.add(rel)
                continue
            _refuse_copy(path, ref, problem)
    missing = sorted(set(files) - found)
    if missing:
        _refuse_copy(path, ref, f"{missing[0]} is missing")


def _refuse_copy(path: Path, ref: str, problem: str):
    raise StoreError(
        f"Bundle {ref}: the cached copy {path} changed since it was verified ({problem}), "
        "so it was not used. Remove that folder to fetch the bundle again."
    )


def _download(src, ref: str, manifest: dict, data: bytes, final: Path) -> None:
    """Copy every listed file of the bundle into `final`, checking sizes and checksums on
    the way, then its Lance tables and artifacts; nothing is left behind on failure."""
    files = manifest["files"]
    total = sum(f["bytes"] for f in files.values())
    log.info(
        "Fetching bundle %s: atlas %s, %d files, %.1f MiB",
        ref,
        manifest["atlas"],
        len(files),
        total / 2**20,
    )
    _check_room(ref, total, final.parent)
    t0 = time.perf_counter()
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        with progress(total=total, desc=f"fetching {manifest['atlas']}", unit="B") as bar:
            for rel in sorted(files):
                _fetch_file(src, ref, rel, files[rel], tmp / rel, bar)
        (tmp / MANIFEST).write_bytes(data)
        check_tables(tmp, ref, files)
        (tmp / _VERIFIED).write_text(json.dumps({"ref": ref, "verified": time.time()}))
        try:
            tmp.rename(final)
        except OSError:
            if not (final / _VERIFIED).exists():  # not a copy another process just finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "Bundle %s: %d files verified (sha256) in %.1f s -> %s",
        ref,
        len(files),
        time.perf_counter() - t0,
        final,
    )


def _check_room(ref: str, total: int, folder: Path) -> None:
    """Refuse a bundle larger than `MAX_BUNDLE_BYTES` (or `$CELLVEC_MAX_BUNDLE_BYTES`), or
    one the cache's disk has no room for, before its first byte is fetched."""
    limit = env_bytes(MAX_BUNDLE_ENV, MAX_BUNDLE_BYTES)
    if total > limit:
        raise StoreError(
            f"Bundle {ref}: its {MANIFEST} lists {_size(total)} of files, more than the "
            f"{_size(limit)} a bundle may hold here; nothing was fetched. If "
            f"you trust it, raise the limit: {MAX_BUNDLE_ENV}={-(-total // 2**30)}G."
        )
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free <= total:
        raise StoreError(
            f"Bundle {ref}: {_size(total)} to fetch, and the cache {folder} has "
            f"{_size(free)} free; nothing was fetched. Free some space, or point "
            f"${CACHE_ENV} at a disk with room."
        )


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:,} bytes"


def _fetch_file(src, ref: str, rel: str, info: dict, dest: Path, bar) -> None:
    h, n = hashlib.sha256(), 0
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with src.open(rel) as f, open(dest, "wb") as out:
            while True:
                block = f.read(_CHUNK)
                if not block:
                    break
                n += len(block)
                if n > info["bytes"]:
                    raise StoreError(
                        f"Bundle {ref}: part {rel} is larger than its manifest says "
                        f"({info['bytes']:,} bytes); the bundle was refused. {REFETCH}"
                    )
                h.update(block)
                out.write(block)
                bar.update(len(block))
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 (URLError, OSError, pyarrow's errors)
        raise StoreError(f"Bundle {ref}: part {rel} could not be read ({e}).") from e
    if n != info["bytes"] or h.hexdigest() != info["sha256"]:
        raise StoreError(
            f"Bundle {ref}: part {rel} does not match its checksum in {MANIFEST} (sha256 "
            f"{h.hexdigest()[:16]}..., {n:,} bytes; expected {info['sha256'][:16]}..., "
            f"{info['bytes']:,} bytes): corrupted or altered. Fetch it again from its source."
        )


def check_tables(folder: Path, ref: str, files: dict) -> None:
    """After the checksums: each Lance table reads only files of its own folder that the
    manifest lists (`files`). A table with base paths (a shallow clone, or data files kept
    elsewhere) could read anything it names, checksummed or not, so it is refused. Its
    columns must be of the plain types cellvec writes, with no encoding chosen in the
    file (`_check_schema`), and what the tables decode to is counted, a few rows at a
    time, before anything reads them whole (`_check_decoded`). (The artifacts' npz
    bytes are checked where they are decoded: `artifacts.decode_arrays`.)"""
    import lance

    budget = MAX_TABLE_EXPANSION * sum(f["bytes"] for f in files.values()) + TABLE_SLACK_BYTES
    for table in sorted(folder.glob("*.lance")):
        part = table.name
        try:
            ds = lance.dataset(str(table))
            bases = ds.base_paths()
            frags = [frag.metadata for frag in ds.get_fragments()]
        except Exception as e:  # noqa: BLE001 (Lance's own errors on a damaged table)
            raise StoreError(f"Bundle {ref}: table {part} cannot be opened ({e}). {REFETCH}") from e
        if bases:
            where = ", ".join(str(b.path) for b in bases.values())
            raise StoreError(
                f"Bundle {ref}: table {part} reads files from other folders ({where}: a "
                f"shallow clone, or base paths); the bundle was refused. {REFETCH}"
            )
        for meta in frags:
            for f in meta.files:
                _check_table_file(ref, part, f"data/{f.path}", f.base_id, files)
            gone = meta.deletion_file
            if gone is not None:
                _check_table_file(ref, part, gone.path(meta.id), gone.base_id, files)
        _check_schema(ds.schema, ref, part)
        budget = _check_decoded(ds, ref, part, budget)


def _check_schema(schema, ref: str, part: str) -> None:
    """Columns of the types cellvec's tables have (strings, numbers, lists of them; bytes
    only in an artifact's `data`), none with an encoding named in its field metadata
    (`lance-encoding:*`: compression, blobs), which cellvec never writes and which let a
    few KB of file decode to gigabytes."""
    import pyarrow as pa

    def plain(t) -> bool:
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return plain(t.value_type)
        return (
            pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_integer(t)
            or pa.types.is_floating(t)
            or pa.types.is_boolean(t)
        )

    for field in schema:
        encoded = [k for k in (field.metadata or {}) if k.startswith(b"lance-encoding:")]
        raw = part.startswith("_artifact_") and field.name == "data"
        if encoded or not (plain(field.type) or (raw and pa.types.is_large_binary(field.type))):
            how = f"encoding {encoded[0].decode(errors='replace')}" if encoded else field.type
            raise StoreError(
                f"Bundle {ref}: table {part} has column {field.name!r} of {how}, which no "
                f"table cellvec writes has; the bundle was refused. {REFETCH}"
            )


def _check_decoded(ds, ref: str, part: str, budget: int) -> int:
    """Decode the table `TABLE_CHECK_ROWS` rows at a time, taking each batch's bytes from
    `budget` (what is left of the bundle's bytes x `MAX_TABLE_EXPANSION`, shared by its
    tables): refused past it, before any reader holds the table whole. Returns what is
    left."""
    try:
        for batch in ds.to_batches(batch_size=TABLE_CHECK_ROWS):
            budget -= batch.nbytes
            if budget < 0:
                raise StoreError(
                    f"Bundle {ref}: its tables decode to more than {MAX_TABLE_EXPANSION} times "
                    f"the bytes fetched (counted up to table {part}); the bundle was refused. "
                    f"{REFETCH}"
                )
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 (Lance's own errors on damaged data)
        raise StoreError(f"Bundle {ref}: table {part} cannot be read ({e}). {REFETCH}") from e
    return budget


def _check_table_file(ref: str, part: str, rel, base_id, files: dict) -> None:
    """A file table `part` reads (`rel`, relative to the table): in the table's own folder
    (no base path) and listed in the bundle's manifest, so it was checksummed."""
    inside = (
        base_id is None
        and isinstance(rel, str)
        and "://" not in rel
        and not rel.startswith("/")
        and all(x not in ("", ".", "..") for x in rel.split("/"))
        and f"{part}/{rel}" in files
    )
    if not inside:
        raise StoreError(
            f"Bundle {ref}: table {part} points at a file outside its folder or not in "
            f"{MANIFEST} ({rel!r}); the bundle was refused. {REFETCH}"
        )
