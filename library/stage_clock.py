"""Wall time per named stage of one run, for `-v` profiles; free when no clock is running.

    with StageClock() as clock:          # the script starts one for -v
        ...
        with stage("sketch"):            # anywhere below: a no-op when no clock runs
            y = m @ omega
    for line in clock.table(total): print(line)

Stages run on several threads (extract's prefetch reads, the input hashing) are summed per stage name
with the thread's own name in front when it is not the main thread, so the table says which work was
overlapped and the column of main-thread stages adds up to (about) the wall time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

_active: StageClock | None = None


class StageClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._start = 0.0
        self.wall = 0.0

    def start(self) -> StageClock:
        global _active
        _active = self
        self._start = time.perf_counter()
        return self

    def stop(self) -> StageClock:
        global _active
        self.wall = time.perf_counter() - self._start
        if _active is self:
            _active = None
        return self

    def __enter__(self) -> StageClock:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def measure(self, name: str):
        thread = threading.current_thread()
        if thread is not threading.main_thread():
            name = f"{thread.name}: {name}"
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self.seconds[name] += elapsed
                self.calls[name] += 1

    def table(self) -> list[str]:
        """One line per stage, slowest first, with its share of the wall time since the clock started."""
        wall = self.wall or (time.perf_counter() - self._start)
        lines = [f"{'stage':<34} {'seconds':>8} {'share':>6} {'calls':>6}"]
        main = 0.0
        for name, secs in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            if ": " not in name:
                main += secs
            lines.append(f"{name:<34} {secs:8.2f} {secs / wall:6.1%} {self.calls[name]:6d}")
        lines.append(f"{'main thread, other (python, waits)':<34} {max(0.0, wall - main):8.2f} "
                     f"{max(0.0, wall - main) / wall:6.1%}")
        lines.append(f"{'wall':<34} {wall:8.2f}")
        return lines


def stage(name: str):
    """Time the enclosed block as `name` on the running clock; nothing when none runs."""
    clock = _active
    return contextlib.nullcontext() if clock is None else clock.measure(name)
