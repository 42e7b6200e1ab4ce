"""Where a run writes a file: one value that checks the path against every file the run reads, and the
atomic write that puts a complete file there or nothing at all.

The rules (README, "What we promise about your files"):
- Inputs are resolved to files: a sharded checkpoint, given as its folder or its `*.index.json`, stands
  for the index and every shard it lists. A destination equal to any of them, by real path (symlinks
  resolved) or by device + inode (hard links), is refused even with --overwrite; so is one equal to
  another output of the same run (`other_outputs`, e.g. --report vs --save_to).
- An existing destination is replaced only with --overwrite, and only when it is a regular file.
- Writing goes to `.tmp-<name>-XXXXXXXX` in the destination folder, sized and checked against the free
  space first when the size is known; the file is fsynced, given the user's umask, and then moved into
  place without replacing anything that appeared meanwhile (renameat2 RENAME_NOREPLACE, else link +
  unlink); --overwrite uses os.replace. On any error or signal the temporary file is removed.

Torch-free on purpose: `--help` and the report writers do not need torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping

from library import interrupts
from library.console import warn
from library.errors import LoraToolsError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# Errors of the destination's disk or folder, which the user fixes; any other OSError stays a bug.
DISK_ERRNOS = _NO_SPACE | {errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}

_COMMITTED: list[str] = []  # every file this process put in place, so an interrupted run can say what exists
_warned_stale: set[str] = set()


def temp_prefix(path: str) -> str:
    return f".tmp-{os.path.basename(path)}-"


def committed_count() -> int:
    return len(_COMMITTED)


def committed_since(count: int) -> list[str]:
    return _COMMITTED[count:]


def input_files(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """The files behind the inputs: a sharded checkpoint (folder or `*.index.json`) is its index and shards."""
    files: list[str] = []
    for item in inputs:
        path = os.path.abspath(os.fspath(item))
        if os.path.isdir(path):
            indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*.index.json")))
            files += indexes + [s for index in indexes for s in _shards_of(index)]
            # Without a readable index every safetensors file of the folder may be a shard.
            files += sorted(glob.glob(os.path.join(glob.escape(path), "*.safetensors")))
        elif path.endswith(".index.json"):
            files += [path, *_shards_of(path)]
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def _shards_of(index_path: str) -> list[str]:
    folder = os.path.dirname(index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        names = [v for v in weight_map.values() if isinstance(v, str)]
    except (OSError, ValueError, AttributeError, RecursionError):
        return sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors")))
    return [os.path.abspath(os.path.join(folder, name)) for name in dict.fromkeys(names)]


def _identity(path: str) -> tuple[str, tuple[int, int] | None]:
    try:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


def _same(a: tuple[str, tuple[int, int] | None], b: tuple[str, tuple[int, int] | None]) -> bool:
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def size_text(n: int) -> str:
    return f"{n:,} bytes" + (f" ({n / 2**20:,.1f} MiB)" if n >= 2**20 else "")


def free_bytes(folder: str) -> int | None:
    """Bytes a write in `folder` can count on: f_bavail, for root too.

    f_bfree adds the blocks reserved for root, but quotas, container overlays and network file systems refuse
    writes into them anyway (a run as root saw f_bfree 157 GB, f_bavail 14 GB, and hit ENOSPC at 14 GB).
    """
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def current_umask() -> int:
    try:  # Linux tells it without changing it (os.umask would race with other threads creating files)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Destination:
    """One file a run writes: its path, the inputs it must never be, and whether it may replace a file.

    `flag` names the option in messages; `other_outputs` maps the flags of the run's other outputs to their
    paths, which this one must not equal either.
    """

    def __init__(self, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False, *,
                 flag: str | None = None, other_outputs: Mapping[str, str | os.PathLike | None] | None = None):
        self.path = os.path.abspath(os.fspath(path))
        self.inputs = tuple(os.fspath(p) for p in inputs)
        self.overwrite = bool(overwrite)
        self.flag = flag
        self.other_outputs = {k: os.fspath(v) for k, v in (other_outputs or {}).items() if v is not None}

    def __repr__(self) -> str:
        return f"Destination({self.path!r}, inputs={list(self.inputs)!r}, overwrite={self.overwrite})"

    @property
    def folder(self) -> str:
        return os.path.dirname(self.path)

    def error(self, message: str) -> LoraToolsError:
        return LoraToolsError(f"{self.flag}: {message}" if self.flag else message, file=self.path)

    def check(self) -> str:
        """Refuse every destination we must not write; returns the absolute path. Cheap: run it before the work."""
        if not os.path.isdir(self.folder):
            raise self.error("output folder does not exist")
        if os.path.isdir(self.path):
            raise self.error("output path is a directory")
        me = _identity(self.path)
        for source in input_files(self.inputs):
            if _same(me, _identity(source)):
                which = "" if os.path.realpath(source) == os.path.realpath(self.path) else f" ({source})"
                raise self.error(f"output path is one of the inputs{which}; refusing to overwrite an input")
        for flag, other in self.other_outputs.items():
            if _same(me, _identity(os.path.abspath(other))):
                raise self.error(f"output path is also the {flag} output; give each output its own file")
        if os.path.lexists(self.path):
            if not self.overwrite:
                raise self.error("output exists; pass --overwrite to replace it")
            if not os.path.isfile(self.path):
                raise self.error("output exists and is not a regular file; refusing to replace it")
        if not os.access(self.folder, os.W_OK):
            raise self.error("cannot create files in the output folder (read-only file system or no permission)")
        self.warn_stale_temps()
        return self.path

    def stale_temps(self) -> list[str]:
        return sorted(glob.glob(os.path.join(glob.escape(self.folder), glob.escape(temp_prefix(self.path)) + "*")))

    def warn_stale_temps(self) -> None:
        stale = [p for p in self.stale_temps() if p not in _warned_stale]
        if stale:
            _warned_stale.update(stale)
            warn(f"leftover temporary file(s) from an earlier run that was killed (or one still writing): "
                 f"{', '.join(stale)}; delete them when no other run is writing {os.path.basename(self.path)}")

    def check_space(self, needed: int) -> None:
        free = free_bytes(self.folder)
        if free is not None and needed > free:
            raise self.error(f"not enough free space: the output needs {size_text(needed)} but "
                             f"{self.folder} has {size_text(free)} free; nothing was written")

    def os_error(self, exc: OSError, needed: int | None = None) -> Exception:
        """A disk or folder problem as one line; any other OSError is returned unchanged (a bug keeps its traceback)."""
        code = exc.errno
        need = f"; the output needs {size_text(needed)}" if needed else ""
        if code in _NO_SPACE:
            free = free_bytes(self.folder)
            now = f", {size_text(free)} free now" if free is not None else ""
            return self.error(f"no space left on the device (or over quota) while writing{need}{now}; "
                              "nothing was written")
        if code == errno.EFBIG:
            return self.error(f"file too large for the file system or the file-size limit (ulimit -f){need}; "
                              "nothing was written")
        if code == errno.EROFS:
            return self.error("the output folder is on a read-only file system; nothing was written")
        if code in (errno.EACCES, errno.EPERM):
            return self.error("permission denied writing in the output folder; nothing was written")
        if code == errno.EIO:
            return self.error("I/O error while writing (failing disk or network mount?); nothing was written")
        return exc

    def place(self, tmp: str) -> None:
        """Move the finished temporary file to the destination (the only step that makes it visible)."""
        if self.overwrite:
            os.replace(tmp, self.path)
            return
        try:
            _move_no_replace(tmp, self.path)
        except FileExistsError:
            raise self.error("output appeared while this run was writing it (another run writing the same "
                             "file?); it was left as it is; pass --overwrite to replace it") from None


class AtomicFile:
    """A temporary file beside the destination that becomes the destination only when complete.

    `open()` returns the binary file to write (the space for `size` bytes is checked first); `commit()`
    fsyncs it, applies the umask and moves it into place; `discard()` removes it and never raises.
    Used as a context manager, it commits when the block succeeds and discards otherwise.
    """

    def __init__(self, destination: Destination, size: int | None = None):
        self.destination = destination
        self.size = size
        self.file = None
        self.tmp: str | None = None

    def open(self):
        dest = self.destination
        if self.size is not None:
            dest.check_space(self.size)
        try:
            with interrupts.deferred():
                fd, self.tmp = tempfile.mkstemp(prefix=temp_prefix(dest.path), dir=dest.folder)
                interrupts.track_temp(self.tmp)
        except OSError as exc:
            raise dest.os_error(exc, self.size) from None
        self.file = os.fdopen(fd, "w+b")
        return self.file

    def commit(self) -> str:
        dest = self.destination
        try:
            self.file.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(self.file.fileno(), 0o666 & ~current_umask())  # mkstemp made it 0600
            os.fsync(self.file.fileno())
            self.file.close()
            with interrupts.deferred():
                dest.place(self.tmp)
                interrupts.untrack_temp(self.tmp)
                self.tmp = None
                _COMMITTED.append(dest.path)
        except OSError as exc:
            self.discard()
            raise dest.os_error(exc, self.size) from None
        finally:
            self.discard()
        _fsync_folder(dest.folder)
        return dest.path

    def discard(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):  # closing flushes, and a full disk fails the flush again
                self.file.close()
        if self.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            interrupts.untrack_temp(self.tmp)
            self.tmp = None

    def __enter__(self):
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            raise self.destination.os_error(exc, self.size) from None


def write_bytes(destination: Destination, data: bytes) -> str:
    """Write a small file atomically under every destination rule; returns its absolute path."""
    destination.check()
    with AtomicFile(destination, size=len(data)) as f:
        f.write(data)
    return destination.path


def write_text(path: str | os.PathLike, text: str, *, inputs: Iterable[str | os.PathLike] = (),
               overwrite: bool = False, flag: str | None = None,
               other_outputs: Mapping[str, str | os.PathLike | None] | None = None) -> str:
    """A text output (a --report JSON, ...) written like every other output: checked, atomic, no-replace."""
    dest = Destination(path, inputs, overwrite, flag=flag, other_outputs=other_outputs)
    return write_bytes(dest, text.encode("utf-8"))


# ---- moving a file into place without replacing one ------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_NO_SUCH_FEATURE = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def _move_no_replace(src: str, dst: str) -> None:
    """Rename src to dst, raising FileExistsError when dst exists, with no window between test and move."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _NO_SUCH_FEATURE:
            raise OSError(code, os.strerror(code), dst)  # EEXIST becomes FileExistsError
    try:
        os.link(src, dst)  # fails with EEXIST whatever appeared at dst, atomically
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_SUCH_FEATURE | {errno.EPERM, errno.EMLINK}:
            raise
        # No hard links here (FAT, exFAT, some FUSE mounts): test then rename, the one remaining window.
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)
