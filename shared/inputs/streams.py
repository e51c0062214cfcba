"""Byte streams of input files, and the bytes they fetched from storage."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import IO, Any

from shared.inputs.files import InputFile, Span
from shared.storage import Storage

# The buffer of a file streamed front to back (CSV, DBN).
STREAM_BUFFER_BYTES = 1 << 20


class ByteCounter:
    """Counts the bytes a reader pulled from storage."""

    def __init__(self) -> None:
        self.bytes = 0


class CountingReader(io.RawIOBase):
    """A seekable reader that counts the bytes read through it (what a job really fetched)."""

    def __init__(self, inner: IO[bytes]) -> None:
        super().__init__()
        self._inner = inner
        self._read_through = 0

    @property
    def bytes_read(self) -> int:
        """Bytes fetched from storage: the inner reader's count where it keeps one (reads it
        served from a prefetched span were counted when the span was fetched)."""
        fetched = getattr(self._inner, "bytes_read", None)
        return fetched if isinstance(fetched, int) else self._read_through

    def prefetch(self, start: int, length: int) -> None:
        """Tell a reader that fetches over the network the span about to be read (else nothing)."""
        prefetch = getattr(self._inner, "prefetch", None)
        if prefetch is not None:
            prefetch(start, length)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def readinto(self, buffer: Any) -> int:
        data = self._inner.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        self._read_through += len(data)
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        # Arrow reads a Python file with `read`: the inner reader's bytes as they come, not
        # io.RawIOBase's way through a new buffer and `readinto` (two more copies of each).
        data = self._inner.read(-1 if size is None else size)
        self._read_through += len(data)
        return data

    def close(self) -> None:
        self._inner.close()
        super().close()


def open_stream(storage: Storage, file: InputFile) -> IO[bytes]:
    """`file` opened for reading front to back, buffered."""
    raw = storage.open_read(file.key)
    if isinstance(raw, io.RawIOBase):
        return io.BufferedReader(raw, buffer_size=STREAM_BUFFER_BYTES)
    return raw


@contextlib.contextmanager
def counted_stream(
    storage: Storage, file: InputFile, counter: ByteCounter | None, span: Span | None = None
) -> Iterator[IO[bytes]]:
    """A streamed input file, closed after use, its bytes added to `counter`.

    An uncompressed file counts what was read (of a `span`, from its start on); a compressed
    one its whole size (the decompressor reads ahead, so the position says little).
    """
    stream = open_stream(storage, file)
    try:
        yield stream
    finally:
        if counter is not None:
            start = span[0] if span is not None else 0
            counter.bytes += max(0, stream.tell() - start) if file.format in ("csv", "dbn") else file.size
        stream.close()


class Borrowed(io.RawIOBase):
    """A stream lent to an Arrow reader: closing this view leaves the stream open.

    Arrow closes the Python file it reads when it drops the reader, which may be before
    the stream's owner is done with it (after a fallback, the position is still counted).
    """

    def __init__(self, inner: IO[bytes], end: int | None = None) -> None:
        super().__init__()
        self._inner = inner
        self._end = end  # no byte at or past this offset is read (a slice of a CSV file)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._inner.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._inner.seek(offset, whence)

    def tell(self) -> int:
        return self._inner.tell()

    def read(self, size: int = -1) -> bytes:
        # Arrow asks for whole blocks through read(); no copy through readinto.
        if self._end is not None:
            left = max(0, self._end - self._inner.tell())
            size = left if size is None or size < 0 else min(size, left)
        return self._inner.read(size)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)
