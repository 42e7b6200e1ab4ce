"""The loop over a sweep's cells: a progress bar, a failing cell reported while the sweep goes on, finished
cells skipped (--resume), and scale-out on existing engines rather than a scheduler of our own:

- `--shard i/N` keeps every N-th cell from the i-th (for batch-array schedulers: one job per shard, then a
  run with --resume and no --shard gathers the summary; every cell is then found finished);
- under `accelerate launch`, accelerate's PartialState splits the cells over the processes
  (split_between_processes: one per GPU, or several machines), each process keeping its own base model
  loaded, and gather_object brings every row to the main process, which writes one CSV and one sheet.

Torch-free at import (merge_grid.py's --help reads `shard_spec` from here).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from library.console import warn
from library.errors import LoraToolsError
from library.grid.spec import Cell


def shard_spec(text: str) -> tuple[int, int]:
    """`i/N` with 0 ≤ i < N, for argparse."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"value {text!r} must be i/N with 0 ≤ i < N, e.g. 0/4")
    return i, n


def shard_cells(cells: list[Cell], shard: tuple[int, int] | None) -> list[Cell]:
    return cells if shard is None else cells[shard[0]::shard[1]]


def process_state():
    """accelerate's view of this process: one process, unless started by `accelerate launch` (or torchrun).

    accelerate gives a CPU-only launch of several processes (its `--cpu` under mpirun, or a launch on a
    machine without CUDA) a distributed state only when asked for the CPU, so that is asked for then: the
    processes meet over gloo."""
    import os

    from accelerate import PartialState
    from accelerate.utils import is_cuda_available

    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    several = any(int(os.environ.get(k, "1") or 1) > 1 for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    return PartialState(cpu=forced or (several and not is_cuda_available()))


def local_cells(cells: list[Cell], state) -> list[Cell]:
    """This process's share of `cells` (the same split run_cells makes)."""
    with state.split_between_processes(cells) as mine:
        return list(mine)


def checked_everywhere(state, check: Callable[[], None]) -> None:
    """Run `check` on every process and raise the first refusal on all of them: a process that stopped alone
    would leave the others waiting for it at the gather."""
    if state.num_processes == 1:
        check()
        return
    from accelerate.utils import gather_object

    try:
        check()
        problems = []
    except LoraToolsError as exc:
        problems = [str(exc)]  # text, not the exception: it crosses processes pickled
    problems = gather_object(problems)
    if problems:
        raise LoraToolsError(problems[0])


def failed_row(cell: Cell, message: str) -> dict:
    return {"index": cell.index, "row": cell.row, "col": cell.col, "label": cell.label, **cell.params,
            "status": "failed", "error": message}


def attempt(work: Callable[[Cell], dict], cell: Cell, debug: bool) -> dict:
    """The cell's row, or a failed row with the reason: one bad cell must not cost the rest of the sweep."""
    try:
        return work(cell)
    except LoraToolsError as exc:
        message = str(exc)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a bug in one cell (e.g. an SVD that does not converge): reported, not fatal
        if debug:
            raise
        message = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    warn(f"cell {cell.index} ({cell.label}) failed: {message}; the sweep goes on")
    return failed_row(cell, message)


def run_cells(cells: list[Cell], work: Callable[[Cell], dict], finished: Callable[[Cell], dict | None], *,
              state, debug: bool = False, bar: bool = True) -> tuple[list[dict], int]:
    """Rows of `cells` split over the processes, gathered (sorted by cell) on every process; and how many of
    this process's cells were skipped as finished."""
    from library.cli import progress

    rows, skipped = [], 0
    mine = local_cells(cells, state)
    label = f"grid [{state.process_index}]" if state.num_processes > 1 else "grid"
    for cell in progress(mine, desc=label, total=len(mine), enabled=bar):
        row = finished(cell)
        if row is not None:
            skipped += 1
        else:
            row = attempt(work, cell, debug)
        rows.append(row)
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    return sorted(rows, key=lambda r: r["index"]), skipped
