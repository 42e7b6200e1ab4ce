"""sha256 of input files from the bytes a streaming pass reads anyway, hashed on a worker thread.

A pass that reads tensors (merge_models.py) hands every buffer it read to `tap(path)(offset, data)`. Each
file's digest is fed strictly in file order: a buffer that starts where the digest stands is hashed as it
is; one further on has the gap before it read from the file and hashed first (by the worker); one behind
is skipped (those bytes are in the digest already). `digests()` hashes whatever of each file is left,
waits for the worker and returns path → hex digest. So a digest is always hashlib.sha256 of the whole file,
whatever the pass read and in whichever order, and a pass in file order reads no byte twice.

hashlib releases the GIL on buffers over 2 KiB (as do readinto and torch's kernels), so the hashing runs on
another core beside the merge instead of as a separate read of every input before it. Buffers of up to
MAX_PENDING_BYTES in all wait for the worker (offering blocks until there is room; one buffer always goes),
so the two threads can drift apart by many chunks while memory stays bounded. The caller must not change
a buffer after offering it.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterable

from library.errors import LoraToolsError

MAX_PENDING_BYTES = 64 << 20
_BLOCK = 1 << 24  # reads of the gaps (bytes the pass never read: headers, copied keys)


class _Digest:
    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)
        self.sha = hashlib.sha256()
        self.cursor = 0  # bytes handed to the worker so far (main thread's count)


class StreamHasher:
    """Hash `paths` from the bytes offered through `tap(path)`; a context manager (the worker stops on exit)."""

    def __init__(self, paths: Iterable[str]):
        self._files = {}
        for p in paths:
            self._files.setdefault(os.path.abspath(p), _Digest(os.path.abspath(p)))
        self._queue: queue.Queue = queue.Queue()
        self._room = threading.Condition()
        self._order = threading.Lock()
        self._pending = 0  # bytes of the buffers queued and not hashed yet
        self._error: tuple[str, OSError] | None = None
        self._abandon = False
        self._thread = threading.Thread(target=self._work, name="loratools-sha256", daemon=True)
        self._thread.start()

    def __enter__(self) -> StreamHasher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tap(self, path: str) -> Callable[[int, memoryview], None] | None:
        """The callback a reader of `path` gives (file offset, bytes read there); None for a file not hashed."""
        digest = self._files.get(os.path.abspath(path))
        if digest is None:
            return None
        return lambda offset, data: self._offer(digest, offset, data)

    def _offer(self, digest: _Digest, offset: int, data: memoryview) -> None:
        with self._order:  # readers on several threads: each file's cursor moves under one lock
            self._offer_in_order(digest, offset, data)

    def _offer_in_order(self, digest: _Digest, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if end <= digest.cursor:
            return
        if offset > digest.cursor:
            self._queue.put((digest, digest.cursor, offset, None))  # a gap holds no memory: the worker reads it
        elif offset < digest.cursor:
            data = data[digest.cursor - offset:]
        with self._room:
            while self._pending and self._pending + len(data) > MAX_PENDING_BYTES:
                self._room.wait()
            self._pending += len(data)
        self._queue.put((digest, 0, 0, data))
        digest.cursor = end

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            digest, start, stop, data = item
            try:
                if self._abandon or self._error is not None:
                    continue
                if data is None:
                    self._hash_range(digest, start, stop)
                else:
                    digest.sha.update(data)
            except OSError as exc:
                self._error = (digest.path, exc)
            finally:
                if data is not None:
                    with self._room:
                        self._pending -= len(data)
                        self._room.notify()

    @staticmethod
    def _hash_range(digest: _Digest, start: int, stop: int) -> None:
        with open(digest.path, "rb") as f:
            f.seek(start)
            while start < stop:
                block = f.read(min(_BLOCK, stop - start))
                if not block:
                    return
                digest.sha.update(block)
                start += len(block)

    def digests(self) -> dict[str, str]:
        """Hash the rest of every file, stop the worker and return {absolute path: sha256 hex}."""
        for digest in self._files.values():
            if digest.cursor < digest.size:
                self._queue.put((digest, digest.cursor, digest.size, None))
                digest.cursor = digest.size
        self._stop()
        if self._error is not None:
            path, exc = self._error
            raise LoraToolsError(f"cannot read the file to hash it: {exc.strerror or exc}", file=path)
        return {path: digest.sha.hexdigest() for path, digest in self._files.items()}

    def close(self) -> None:
        """Stop without finishing (an error elsewhere): queued work is skipped."""
        self._abandon = True
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
