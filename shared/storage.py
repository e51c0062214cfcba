"""One small storage interface over S3 (boto3) and local paths.

A `Storage` is rooted at a location URI (``s3://bucket/prefix`` or a local path, ``file://``
optional); keys are ``/``-separated and relative to that root. Writes are atomic: an object
is either absent or complete (S3 PUTs are atomic; locally we write a temporary file and
rename it). Reads of S3 objects are ranged, so Parquet readers fetch only the footer and the
row groups they need instead of downloading whole objects.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, Protocol, cast
from urllib.parse import urlparse, urlsplit

from shared.errors import PermanentError, TransientError
from shared.settings import s3_requests


@dataclass(frozen=True)
class ObjectInfo:
    """A stored object: its key relative to the storage root, its size in bytes, and a
    `version` that changes whenever it is written again (its ETag on S3, its modification time
    in nanoseconds on a local disk; empty where the store gives none)."""

    key: str
    size: int
    version: str = ""


class Storage(Protocol):
    """What every component needs from an object store."""

    uri: str
    # How many requests to this store are worth having in flight at once: an object store's
    # requests wait on the network, a local disk's do not.
    parallel_requests: int

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with `prefix`, in key order."""
        ...

    def keys(self, prefix: str = "") -> Iterator[str]:
        """The keys `list` gives, without their sizes (on a local disk a size costs a ``stat``
        per object: a run's markers are listed for their names alone)."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object exists."""
        ...

    def size(self, key: str) -> int:
        """The object's size in bytes; `PermanentError` when it does not exist."""
        ...

    def age(self, key: str) -> float | None:
        """Seconds since the object was last written, by the store's own clock (so that
        writers and readers on hosts whose clocks differ agree); None when it does not exist."""
        ...

    def read_bytes(self, key: str) -> bytes:
        """The whole object (meant for small objects: manifests, results, markers)."""
        ...

    def write_bytes(self, key: str, data: bytes, content_type: str = ...) -> None:
        """Store `data` under `key`, atomically."""
        ...

    def write_file(self, key: str, path: Path, content_type: str = ...) -> None:
        """Store a local file under `key`, atomically (multipart on S3 for large files)."""
        ...

    def mark(self, key: str) -> None:
        """Make sure an empty object exists under `key` (a marker: only its presence counts)."""
        ...

    def create(self, key: str, data: bytes) -> bool:
        """Store `data` under `key` only if nothing is there yet: True when this call created
        it. Of writers racing for one key, exactly one wins."""
        ...

    def prepare(self, keys: Iterable[str]) -> None:
        """Get ready to store objects under `keys` soon (a hint: where keys need folders,
        they are made now, so that storing later costs less)."""
        ...

    def open_read(self, key: str) -> IO[bytes]:
        """A seekable binary reader; on S3 every read is a ranged GET."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; absent objects are fine."""
        ...

    def describe(self, key: str = "") -> str:
        """The full URI of `key`, for messages and logs."""
        ...


# Stored files are readable by the group and others, as files written directly would be
# (temporary files start private).
FILE_MODE = 0o644
# Local files of tickq's own (temporary files, the shared marker) start with this and are
# never listed as objects.
HIDDEN_PREFIX = ".tickq-"
# The empty file local markers are hard links to.
MARKER_NAME = f"{HIDDEN_PREFIX}marker"


def _normalise_key(key: str) -> str:
    parts = [p for p in key.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise PermanentError(f"storage key {key!r} must not contain '.' or '..' segments")
    return "/".join(parts)


class LocalStorage:
    """Storage rooted at a local directory."""

    parallel_requests = 1

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)
        self._dirs: set[str] = set()  # folders made or found
        self._marker_source = os.path.join(self.uri, MARKER_NAME)
        # Temporary names: unique per instance and write, without drawing a random name each time
        # (the token keeps a restarted process with the same pid clear of its leftovers).
        self._tmp_prefix = f"{HIDDEN_PREFIX}tmp-{os.getpid()}-{secrets.token_hex(4)}-"
        self._tmp_names = itertools.count()

    def _tmp_path(self, directory: Path) -> Path:
        return directory / f"{self._tmp_prefix}{next(self._tmp_names)}"

    def _path(self, key: str) -> Path:
        key = _normalise_key(key)
        return self.root / key if key else self.root

    def describe(self, key: str = "") -> str:
        return str(self._path(key))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Taken whole before the first is given: a caller may delete what it is given (and so
        # the folders that held it) as it goes.
        found = []
        for key, entry in self._walk(prefix):
            stat = entry.stat()
            found.append(ObjectInfo(key, stat.st_size, str(stat.st_mtime_ns)))
        yield from found

    def keys(self, prefix: str = "") -> Iterator[str]:
        # Given folder by folder as the walk goes: a listing of a run's markers holds one
        # folder's entries at a time, not a million keys.
        for key, _ in self._walk(prefix):
            yield key

    def _walk(self, prefix: str) -> Iterator[tuple[str, os.DirEntry[str] | Path]]:
        """(key, file) of every object whose key starts with `prefix`, in key order."""
        prefix = prefix.lstrip("/")
        # Walk only the directory the prefix names (or the one holding its last segment).
        base_key = prefix if prefix.endswith("/") or "/" not in prefix else prefix.rsplit("/", 1)[0] + "/"
        if not prefix.endswith("/") and "/" not in prefix:
            base_key = ""
        base = self._path(base_key)
        if base.is_dir():
            yield from self._walk_folder(str(base), len(str(self.root)) + len(os.sep), prefix)
        elif base.is_file() and base_key.rstrip("/").startswith(prefix):
            yield base_key.rstrip("/"), base

    def _walk_folder(self, folder: str, root_length: int,
                     prefix: str) -> Iterator[tuple[str, os.DirEntry[str] | Path]]:
        try:
            with os.scandir(folder) as scan:
                entries = [entry for entry in scan if not entry.name.startswith(HIDDEN_PREFIX)]
        except FileNotFoundError:  # removed since its parent was read: it holds nothing now
            return
        # In key order: a folder's keys follow its name and a "/".
        entries.sort(key=lambda entry: entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name)
        for entry in entries:
            key = entry.path[root_length:].replace(os.sep, "/")
            if entry.is_dir(follow_symlinks=False):
                # Only folders that can hold keys with the prefix, or lead to them.
                folder_key = key + "/"
                if folder_key.startswith(prefix) or prefix.startswith(folder_key):
                    yield from self._walk_folder(entry.path, root_length, prefix)
            elif key.startswith(prefix):
                yield key, entry

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise PermanentError(f"{self.describe(key)} does not exist") from None

    def age(self, key: str) -> float | None:
        try:
            return max(0.0, time.time() - self._path(key).stat().st_mtime)
        except FileNotFoundError:
            return None

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise PermanentError(f"{self.describe(key)} does not exist") from None

    def write_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        target = self._path(key)
        try:
            self._write_in(target, data)
        except FileNotFoundError:  # the directory went away since it was made: make it again
            self._dirs.discard(str(target.parent))
            self._write_in(target, data)

    def create(self, key: str, data: bytes) -> bool:
        target = self._path(key)
        self._make_parent(target)
        tmp = self._staged(target.parent, data)
        try:
            # A link fails where the name exists: the object appears whole, and only once.
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _write_in(self, target: Path, data: bytes) -> None:
        self._make_parent(target)
        tmp = self._staged(target.parent, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _staged(self, directory: Path, data: bytes) -> Path:
        """A new temporary file in `directory` holding `data` (the caller moves or removes it)."""
        tmp = self._tmp_path(directory)
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def mark(self, key: str) -> None:
        """An empty object at `key`: a hard link to one shared empty file under the root.

        Markers are many (one per job) and only their presence counts. What makes a file
        costly on a local disk is allocating its inode; a link is only a directory entry.
        Where links are not supported the marker is an empty file of its own. Paths are plain
        strings here: building them with pathlib cost more than the link itself.
        """
        target = os.path.join(self.uri, _normalise_key(key))
        folder = os.path.dirname(target)
        source = self._marker_source
        for _ in range(3):
            try:
                self._make_dir(folder)
                os.link(source, target)
                return
            except FileExistsError:
                return  # marked before
            except FileNotFoundError:  # the shared file (first marker here) or the directory is gone
                if not os.path.exists(source):
                    self._renew_marker()
                self._dirs.discard(folder)
            except OSError as exc:
                if exc.errno != errno.EMLINK:
                    break  # no hard links on this file system
                self._renew_marker()  # the shared file has all the links it may have
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, FILE_MODE))

    def _renew_marker(self) -> None:
        """A fresh shared empty file, swapped in atomically: other processes link to it too."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_path(self.root)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
        os.replace(tmp, self._marker_source)

    def prepare(self, keys: Iterable[str]) -> None:
        # Making a folder can cost a millisecond of the kernel's time on a journalling file
        # system, where linking a marker into it costs microseconds.
        # Keys are many and their folders few: only the distinct folders become paths.
        for folder in {key.rpartition("/")[0] for key in keys}:
            if folder := _normalise_key(folder):
                self._make_dir(os.path.join(self.uri, folder))

    def _make_parent(self, target: Path) -> None:
        """Create `target`'s directory once."""
        self._make_dir(target.parent)

    def _make_dir(self, folder: str | Path) -> None:
        """Create `folder` once; folders known to exist are not checked again."""
        name = os.fspath(folder)
        if name not in self._dirs:
            os.makedirs(name, exist_ok=True)
            self._dirs.add(name)

    def write_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        target = self._path(key)
        self._make_parent(target)
        tmp = self._tmp_path(target.parent)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, FILE_MODE))
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open_read(self, key: str) -> IO[bytes]:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise PermanentError(f"{self.describe(key)} does not exist") from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


_S3_CLIENTS: dict[str | None, Any] = {}
_S3_LOCK = threading.Lock()


def s3_client(endpoint_url: str | None) -> Any:
    """A shared, thread-safe boto3 S3 client with boto3's standard retry mode.

    boto3 clients are thread-safe; sharing one keeps its connection pool warm.
    """
    with _S3_LOCK:
        client = _S3_CLIENTS.get(endpoint_url)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "max_attempts": 4},
                connect_timeout=5,
                read_timeout=60,
                # Room for the requests a process keeps in flight (`_each`) and for the reads
                # and claim renewals beside them.
                max_pool_connections=s3_requests() + 16,
                # Newer botocore adds CRC checksums to every PUT; S3-compatible stores
                # (and older MinIO) do not all accept them.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
            _S3_CLIENTS[endpoint_url] = client
        return client


def _classify_boto_error(exc: Exception, what: str) -> Exception:
    """Map a botocore failure to tickq's error classes, with a one-line message."""
    from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in ("NoSuchKey", "404", "NotFound"):
            return PermanentError(f"{what} does not exist")
        if code == "NoSuchBucket":
            return PermanentError(f"{what}: bucket does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return PermanentError(f"{what}: access denied ({code})")
        if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "ServiceUnavailable"):
            return TransientError(f"{what}: object store answered {status or code}")
        return PermanentError(f"{what}: {code or status}")
    if isinstance(exc, ParamValidationError):
        return PermanentError(f"{what}: invalid request ({type(exc).__name__})")
    if isinstance(exc, BotoCoreError):
        # Transient for a job (an endpoint comes back, a role's credentials arrive); said
        # plainly, since a command stops on it and its user has a setting to fix.
        return TransientError(f"{what}: {_unreached(exc)}")
    return exc


def _unreached(exc: Exception) -> str:
    """Why a request never got an answer from the object store, in words."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError

    requested = urlsplit(str(getattr(exc, "kwargs", {}).get("endpoint_url", "")))
    endpoint = f"{requested.scheme}://{requested.netloc}" if requested.netloc else "its endpoint"
    if isinstance(exc, ConnectTimeoutError | ReadTimeoutError):
        return f"the object store at {endpoint} did not answer in time ({type(exc).__name__})"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach the object store at {endpoint} (check TICKQ_S3_ENDPOINT_URL and the network)"
    if isinstance(exc, NoCredentialsError):
        return ("no credentials for the object store (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "AWS_PROFILE, or a role for the machine)")
    return type(exc).__name__


class S3Storage:
    """Storage rooted at ``s3://bucket/prefix``."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = _normalise_key(prefix)
        self.parallel_requests = s3_requests()  # within the shared client's connection pool
        self.endpoint_url = endpoint_url
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = s3_client(endpoint_url)

    def _key(self, key: str) -> str:
        key = _normalise_key(key)
        return f"{self.prefix}/{key}" if self.prefix and key else (self.prefix or key)

    def describe(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            mapped = _classify_boto_error(exc, what)
            if mapped is exc:
                raise
            raise mapped from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(prefix.rstrip("/")) + ("/" if prefix.endswith("/") else "")
        if not prefix and self.prefix:
            full = self.prefix + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(f"listing {self.describe(prefix)}", self._client.list_objects_v2, **kwargs)
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][strip:], int(item["Size"]), str(item.get("ETag", "")))
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def keys(self, prefix: str = "") -> Iterator[str]:
        # A listing page carries the sizes at no extra cost.
        for info in self.list(prefix):
            yield info.key

    def exists(self, key: str) -> bool:
        try:
            self._call(self.describe(key), self._client.head_object, Key=self._key(key))
            return True
        except PermanentError as exc:
            if "does not exist" in str(exc):
                return False
            raise

    def size(self, key: str) -> int:
        head = self._call(self.describe(key), self._client.head_object, Key=self._key(key))
        return int(head["ContentLength"])

    def age(self, key: str) -> float | None:
        try:
            head = self._call(self.describe(key), self._client.head_object, Key=self._key(key))
        except PermanentError as exc:
            if "does not exist" in str(exc):
                return None
            raise
        # The response's Date and the object's Last-Modified both come from the store's clock
        # (to the second); a store that sends no Date is compared with this host's clock.
        sent = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(sent).timestamp() if sent else time.time()
        return max(0.0, now - head["LastModified"].timestamp())

    def read_bytes(self, key: str) -> bytes:
        obj = self._call(self.describe(key), self._client.get_object, Key=self._key(key))
        try:
            return bytes(obj["Body"].read())
        except Exception as exc:
            raise _classify_boto_error(exc, self.describe(key)) from exc

    def write_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._call(
            self.describe(key), self._client.put_object, Key=self._key(key), Body=data, ContentType=content_type
        )

    def create(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            # 409: another conditional write of the key is in flight, and one of them will win.
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise _classify_boto_error(exc, self.describe(key)) from exc
        except Exception as exc:
            raise _classify_boto_error(exc, self.describe(key)) from exc

    def write_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        try:
            self._client.upload_file(
                str(path), self.bucket, self._key(key), ExtraArgs={"ContentType": content_type}
            )
        except Exception as exc:
            mapped = _classify_boto_error(exc, self.describe(key))
            if mapped is exc:
                raise TransientError(f"{self.describe(key)}: upload failed ({type(exc).__name__})") from exc
            raise mapped from exc

    def mark(self, key: str) -> None:
        self.write_bytes(key, b"", "application/octet-stream")

    def prepare(self, keys: Iterable[str]) -> None:
        pass  # an object store has no folders to make

    def open_read(self, key: str) -> IO[bytes]:
        return cast(IO[bytes], _S3RangeReader(self, key, self.size(key)))

    def delete(self, key: str) -> None:
        self._call(self.describe(key), self._client.delete_object, Key=self._key(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Bytes [start, start+length) of the object, in one ranged GET."""
        end = start + length - 1
        obj = self._call(
            self.describe(key), self._client.get_object, Key=self._key(key), Range=f"bytes={start}-{end}"
        )
        try:
            return bytes(obj["Body"].read())
        except Exception as exc:
            raise _classify_boto_error(exc, self.describe(key)) from exc


class _S3RangeReader(io.RawIOBase):
    """A seekable reader over one S3 object; each `read` is one ranged GET.

    Wrap it in `io.BufferedReader` for sequential streaming (CSV); Parquet readers seek to
    the footer and to the column chunks they need, so they fetch only those bytes. A reader
    that knows the span it is about to read (a row group's column chunks) says so with
    `prefetch`: one GET for the span, and the reads within it are served from memory, rather
    than a round trip per column chunk.
    """

    def __init__(self, storage: S3Storage, key: str, size: int) -> None:
        super().__init__()
        self._storage = storage
        self._key = key
        self._size = size
        self._pos = 0
        self.bytes_read = 0
        self._window_start = 0
        self._window = b""

    def prefetch(self, start: int, length: int) -> None:
        """Fetch bytes [start, start+length) in one GET for the reads that follow."""
        length = min(length, self._size - start)
        if start < 0 or length <= 0:
            return
        self._window = b""  # the previous window is released before the next is fetched
        self._window = self._storage.get_range(self._key, start, length)
        self._window_start = start
        self.bytes_read += len(self._window)

    def _windowed(self, size: int) -> memoryview | None:
        """The next `size` bytes from the prefetched window, if it holds all of them."""
        offset = self._pos - self._window_start
        if offset < 0 or offset + size > len(self._window):
            return None
        return memoryview(self._window)[offset : offset + size]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = self._size + offset
        self._pos = max(0, self._pos)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        windowed = self._windowed(want)
        if windowed is not None:
            view[:want] = windowed
            self._pos += want
            return want
        data = self._storage.get_range(self._key, self._pos, want)
        n = len(data)
        view[:n] = data
        self._pos += n
        self.bytes_read += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._size - self._pos
        size = min(size, self._size - self._pos)
        if size <= 0:
            return b""
        windowed = self._windowed(size)
        if windowed is not None:
            self._pos += size
            return bytes(windowed)
        data = self._storage.get_range(self._key, self._pos, size)
        self._pos += len(data)
        self.bytes_read += len(data)
        return data

    def size(self) -> int:
        return self._size


_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


def open_storage(uri: str, endpoint_url: str | None = None) -> Storage:
    """The storage a location URI names: ``s3://bucket/prefix``, ``file:///path`` or a path."""
    if "\x00" in uri or any(ord(c) < 32 for c in uri):
        raise PermanentError("storage location contains control characters")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if "@" in parsed.netloc:
            raise PermanentError("s3 locations carry no credentials: use the AWS_* environment instead")
        if not _BUCKET_RE.match(parsed.netloc):
            raise PermanentError(f"storage location {uri!r} names no valid bucket (expected s3://bucket/prefix)")
        return S3Storage(parsed.netloc, parsed.path.lstrip("/"), endpoint_url)
    if parsed.scheme == "file":
        return LocalStorage(parsed.path)
    if parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStorage(uri)
    raise PermanentError(f"unsupported storage location {uri!r}: use s3://bucket/prefix or a local path")
