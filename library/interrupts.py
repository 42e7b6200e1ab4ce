"""Signals during a run: SIGTERM and SIGHUP unwind like Ctrl-C does, and no temporary file outlives them.

A pipeline, a Colab "stop" or a batch scheduler ends a job with SIGTERM (or SIGHUP when the terminal
goes away); their default action kills the process on the spot, leaving a full-size temporary file.
- In a script, `run_cli` turns them into `Interrupted` (a KeyboardInterrupt), so the writers' normal
  unwinding removes their temporary files, and the runner exits with 128 + the signal number.
- Without the runner (a notebook, a library call) nothing turns them into exceptions, so while a
  temporary file exists the writer installs a last-resort handler that removes it and then lets the
  signal act as it would have (only where that signal still has its default action).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from library.errors import Interrupted

TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_DEFERRED = (signal.SIGINT, *TERMINATING)

_lock = threading.Lock()
_live_temps: set[str] = set()
_fallback: dict[int, object] = {}  # signal -> the handler it had before ours (always SIG_DFL)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum, _frame) -> None:
    # A second signal while we clean up gets the default action: a stuck cleanup can still be killed.
    signal.signal(signum, signal.SIG_DFL)
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_as_exceptions():
    """While the block runs, SIGTERM/SIGHUP raise `Interrupted` in the main thread; handlers are restored after."""
    if not _in_main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in TERMINATING}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT/SIGTERM/SIGHUP back during a few system calls that must not be split (create + register a
    temporary file; link + unlink it); a signal that came meanwhile is delivered when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def track_temp(path: str) -> None:
    """A temporary file now exists: remove it if the process is terminated before `untrack_temp`."""
    with _lock:
        _live_temps.add(path)
    if _in_main_thread():
        for signum in TERMINATING:
            if signum not in _fallback and signal.getsignal(signum) == signal.SIG_DFL:
                _fallback[signum] = signal.signal(signum, _remove_temps_then_default)


def untrack_temp(path: str) -> None:
    with _lock:
        _live_temps.discard(path)
        idle = not _live_temps
    if idle and _in_main_thread():
        for signum in list(_fallback):
            if signal.getsignal(signum) is _remove_temps_then_default:
                signal.signal(signum, _fallback[signum])
            del _fallback[signum]


def _remove_temps_then_default(signum, _frame) -> None:
    with _lock:
        temps = list(_live_temps)
    for path in temps:
        with contextlib.suppress(OSError):
            os.unlink(path)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
