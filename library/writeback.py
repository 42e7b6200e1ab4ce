"""Start the disk writing of an output's dirty pages early, so the disk works while the merge computes.

Without it Linux writes a file's pages back only once a tenth of memory is dirty (or they are 30 s old):
the disk idles for the first seconds of a multi-GB output and the last gigabytes wait for the final
fsync. `sync_file_range(SYNC_FILE_RANGE_WRITE)` queues what is dirty now and returns without waiting for
it. Measured with merge_lora into a 6.4 GiB SDXL checkpoint on this 2-core VM: 35.4 s without, 32.0 s
with (the final fsync 3.8 → 0.6 s). Elsewhere (no Linux, a filesystem that refuses it) this does nothing:
the final fsync still makes the file durable and reports any error.
"""

from __future__ import annotations

import ctypes
import ctypes.util

EVERY_BYTES = 64 << 20  # one call per this many bytes written: a few hundred calls for a large checkpoint
_SYNC_FILE_RANGE_WRITE = 2


def _load():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_sync_file_range = _load()


class Writeback:
    """Counts bytes written to one file and queues its dirty pages for the disk every EVERY_BYTES."""

    def __init__(self, every: int | None = None):
        self.every = every or EVERY_BYTES
        self._since = 0

    def wrote(self, file, nbytes: int) -> None:
        """`nbytes` were just written to `file` (a buffered file object, flushed here before the call)."""
        self._since += nbytes
        if self._since < self.every or _sync_file_range is None:
            return
        self._since = 0
        file.flush()
        _sync_file_range(file.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE)  # errors: the final fsync reports them
