"""Extracting a LoRA from two checkpoints, one layer at a time.

The plan (`plan_layers`) decides from shapes alone what each key becomes: a low-rank pair
(2-D weights and convs), a full difference `diff` (`--lora_type full_diff`, or 1-D norm weights with
`--bias_diff`), a bias difference `diff_b`, or nothing (listed with the reason). `extract_layer`
then reads one (base, tuned) pair, forms ΔW in float32 on the compute device, measures its exact
Frobenius norm, and hands it to the low-rank engine (library/lowrank_engine.py: randomized SVD by
default, exact with `exact_svd`), which measures the error of the factors *as they will be stored*
(after the optional clamp and the cast to the save dtype), so the report's retained energy is the
truth about the file, not an estimate from a truncated spectrum.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from library.checks import NonFiniteTracker, is_finite
from library.extract.pairs import CheckpointPair
from library.lowrank import fast_sq_norm
from library.lowrank_engine import EngineSettings, LayerResult, LowRankJob, run_dense
from library.stage_clock import stage


@dataclass
class ExtractOptions:
    lora_type: str = "standard"  # "standard": low-rank pairs; "full_diff": every weight as `diff`
    dim: int = 4  # rank of Linear and 1×1 conv layers (cap for the dynamic methods)
    conv_dim: int | None = None  # rank of k×k convs; None = not extracted (sd-scripts' behaviour)
    dynamic_method: str | None = None  # sv_ratio | sv_fro | sv_cumulative (resize_lora's rules)
    dynamic_param: float | None = None
    bias_diff: bool = False  # also store bias (`diff_b`) and 1-D weight (`diff`) differences
    min_diff: float = 0.0  # skip a layer whose largest |ΔW| is below this
    exact_svd: bool = False
    svd_iters: int = 2  # power iterations of the randomized SVD (the most; see svd_tol)
    # Stop the power iterations once one improved the layer's error² by at most this share of it
    # (lowrank.randomized_svd's adaptive rule); None = always svd_iters.
    svd_tol: float | None = 1e-3
    oversample: int | None = None  # extra sketch columns; None = lowrank's default (the rank, at least 10)
    clamp_quantile: float | None = None  # sd-scripts' clamp, off unless asked for
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    load_dtype: torch.dtype | None = None  # cast both weights to this before subtracting (sd-scripts' --load_precision)
    save_dtype: torch.dtype = torch.float32
    seed: int = 0


@dataclass
class LayerTask:
    """One unit of work: a checkpoint key (optionally a row slice of it) and what to make of it."""

    key: str
    role: str
    shape: tuple[int, ...]
    name: str  # output module name (naming is decided by the caller)
    rank: int | None = None  # requested rank for "lowrank"
    rows: tuple[int, int] | None = None  # row slice of a fused weight
    target: object | None = None  # the canonical target when a model family is known


@dataclass
class ExtractedLayer:
    """What one task gave: its tensors (kohya suffixes), or why it was skipped; `lowrank` for low-rank tasks."""

    task: LayerTask
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # kohya suffix -> tensor (save dtype, CPU)
    rank: int | None = None
    norm: float = 0.0
    error: float = 0.0
    max_abs: float = 0.0
    skipped: str | None = None
    seconds: float = 0.0
    lowrank: LayerResult | None = None  # the engine's result (its report figures) for a low-rank task

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0

    @property
    def energy_retained(self) -> float:
        return 1.0 - self.relative_error**2 if self.norm > 0 else 1.0


def classify(key: str, shape: tuple[int, ...], dtype: torch.dtype, options: ExtractOptions) -> tuple[str | None, str]:
    """(role, reason) for one checkpoint key; role None means skipped for `reason`."""
    if not dtype.is_floating_point:
        return None, f"not a floating-point tensor ({dtype})"
    # `_weight`/`_bias` too: fused OpenCLIP `in_proj_weight` / `in_proj_bias` are weights and biases.
    if key.endswith((".bias", "_bias")):
        return ("diff_b", "") if options.bias_diff else (None, "bias (stored only with --bias_diff)")
    if not key.endswith((".weight", "_weight")):
        return None, "not a weight or bias tensor"
    if options.lora_type == "full_diff":
        if len(shape) < 2 and not options.bias_diff:
            return None, "1-D weight (stored only with --bias_diff)"
        return "diff", ""
    if len(shape) == 1:
        return ("diff", "") if options.bias_diff else (None, "1-D (norm) weight (stored only with --bias_diff)")
    if len(shape) == 2:
        return "lowrank", ""
    if len(shape) == 4:
        if tuple(shape[2:]) == (1, 1):
            return "lowrank", ""
        if options.conv_dim is None:
            return None, f"{shape[2]}x{shape[3]} conv (extracted only with --conv_dim)"
        return "lowrank", ""
    return None, f"{len(shape)}-D weight has no LoRA form (use --lora_type full_diff)"


def requested_rank(shape: tuple[int, ...], options: ExtractOptions) -> int:
    """--conv_dim for k×k convs, --dim for everything else, never above the matrix's own rank."""
    spatial = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
    want = options.conv_dim if spatial else options.dim
    cols = math.prod(shape[1:])
    return max(1, min(int(want), shape[0], cols))


def plan_layers(pair: CheckpointPair, keys: Iterable[str], options: ExtractOptions,
                targets_of: Callable[[str], list[tuple[str, tuple[int, int] | None, object | None]]],
                ) -> tuple[list[LayerTask], list[tuple[str, str]]]:
    """Tasks for the keys that become part of the LoRA, and (key, reason) for the others.

    `targets_of(key)` gives the output module(s) of a key as (name, rows, target): one for a plain
    weight, several for a fused weight that the output format splits (e.g. q/k/v rows of `in_proj_weight`).
    """
    tasks: list[LayerTask] = []
    skipped: list[tuple[str, str]] = []
    for key in keys:
        full_shape = pair.shape(key)
        for name, rows, target in targets_of(key):
            shape = full_shape if rows is None else (rows[1] - rows[0], *full_shape[1:])
            role, reason = classify(key, shape, pair.dtype(key), options)
            if role is None:
                skipped.append((key, reason))
                continue
            rank = requested_rank(shape, options) if role == "lowrank" else None
            tasks.append(LayerTask(key=key, role=role, shape=shape, name=name, rank=rank, rows=rows, target=target))
    return tasks, skipped


def difference(base: torch.Tensor, tuned: torch.Tensor, options: ExtractOptions) -> torch.Tensor:
    """tuned − base in float32 on the compute device (after --load_precision's cast, as sd-scripts does).

    One float32 buffer: the subtraction of the (usually fp16) base happens in place, so a layer costs
    its two stored tensors plus one float32 copy, not three.
    """
    if options.load_dtype is not None:
        base, tuned = base.to(options.load_dtype), tuned.to(options.load_dtype)
    delta = tuned.to(options.device, torch.float32, copy=True)
    delta.sub_(base.to(options.device))
    return delta


def exact_norm_sq(tensor: torch.Tensor) -> float:
    """‖tensor‖_F² of any shape: float32 chunks summed in float64 (lowrank.fast_sq_norm, ≈ 1e-7 relative)."""
    return float(fast_sq_norm(tensor))


def exact_norm(tensor: torch.Tensor) -> float:
    return math.sqrt(exact_norm_sq(tensor))


def max_abs(tensor: torch.Tensor) -> float:
    lo, hi = torch.aminmax(tensor)  # no |x| temporary
    return max(-float(lo), float(hi))


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only).

    glibc serves the large per-layer temporaries from its heap once its dynamic mmap threshold has
    grown; the small factors we keep then sit above the freed space and the heap never shrinks, so
    without this the process's resident memory grows by a layer's workspace every few layers.
    `run_extraction` calls it once per TRIM_EVERY_BYTES of differences, not per layer: a trim walks the
    whole heap (≈ 20 ms), and between trims the freed space is reused by the next layers anyway.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
TRIM_EVERY_BYTES = 512 << 20


def extract_layer(task: LayerTask, delta: torch.Tensor, options: ExtractOptions) -> ExtractedLayer:
    """One task on the key's difference `delta` (float32, on the device). Works in place on the task's rows:
    tasks of one key take disjoint row slices, so they may share the buffer."""
    start = time.perf_counter()
    result = ExtractedLayer(task)
    if task.rows is not None:
        delta = delta[task.rows[0]:task.rows[1]]
    with stage("norm and max |difference|"):
        norm_sq = exact_norm_sq(delta) if delta.numel() else 0.0
        result.norm = math.sqrt(norm_sq)
        result.max_abs = max_abs(delta) if delta.numel() else 0.0
    if result.norm == 0.0:
        result.skipped = "no difference"
    elif result.max_abs < options.min_diff:
        result.skipped = f"largest |difference| {result.max_abs:.3g} is below --min_diff {options.min_diff:g}"
    elif task.role == "lowrank":
        _low_rank(task, delta, options, result, norm_sq)
    else:
        stored = delta.to(options.save_dtype)
        if stored is delta:  # float32 output: the difference itself, exactly
            stored = stored.clone() if task.rows is not None else stored  # a row slice would pin the whole layer
        else:
            result.error = exact_norm(delta.sub_(stored.float()))  # what the cast to the save dtype lost
        result.tensors = {task.role: stored.cpu()}
    result.seconds = time.perf_counter() - start
    return result


def engine_settings(options: ExtractOptions) -> EngineSettings:
    return EngineSettings(oversample=options.oversample, power_iters=options.svd_iters, seed=options.seed,
                          exact_dense=options.exact_svd, clamp_quantile=options.clamp_quantile,
                          alpha_dtype=options.save_dtype, factor_dtype=options.save_dtype, device=options.device,
                          adaptive_tol=options.svd_tol, fast_norms=True)


def _low_rank(task: LayerTask, delta: torch.Tensor, options: ExtractOptions, result: ExtractedLayer,
              norm_sq: float) -> None:
    # Seeded by the checkpoint key (row slices of one fused key share it); the delta is ours to overwrite, and
    # its ‖ΔW‖² (measured above) is the engine's total: no second float64 pass over the layer.
    job = LowRankJob(name=task.name, shape=tuple(delta.shape), max_rank=task.rank, dense=delta,
                     method=options.dynamic_method, param=options.dynamic_param, seed_name=task.key, scratch=True,
                     total_sq=norm_sq)
    low = run_dense(job, engine_settings(options))
    result.lowrank = low
    result.error = math.sqrt(low.error_sq)
    result.rank = low.rank
    result.tensors = {"lora_down.weight": low.down, "lora_up.weight": low.up,
                      "alpha": torch.tensor(float(low.alpha), dtype=options.save_dtype)}


def run_extraction(pair: CheckpointPair, tasks: list[LayerTask], options: ExtractOptions,
                   progress: Callable[[Iterable, int], Iterable] | None = None) -> list[ExtractedLayer]:
    """Run every task, reading each key's pair once (fused keys with several row slices share one read).

    The next key's pair is read and subtracted on a second thread while this key's SVD runs
    (`PairPrefetcher`): file reads and torch kernels release the GIL, so reading overlaps the maths.
    NaN/inf in either model is refused (library/checks.py): a non-finite input always makes the
    difference non-finite, so one cheap sum of the difference screens both inputs; only when it is not
    finite are the two tensors checked by name, and then the work stops and the remaining keys are only
    scanned, so that the error names how many tensors of which file are affected.
    """
    by_key: dict[str, list[LayerTask]] = {}
    for task in tasks:
        by_key.setdefault(task.key, []).append(task)
    keys = list(by_key)
    iterator = keys if progress is None else progress(keys, len(keys))
    results: list[ExtractedLayer] = []
    trackers = (NonFiniteTracker(pair.base_path, refuse=True), NonFiniteTracker(pair.tuned_path, refuse=True))
    since_trim = 0
    with PairPrefetcher(pair, keys, options) as prefetcher:
        for index, key in enumerate(iterator):
            delta, finite, read_seconds = prefetcher.take(key)
            if not finite:
                prefetcher.stop()  # the checks below read on this thread
                base, tuned = pair.read(key)
                if not all([trackers[0].check(key, base), trackers[1].check(key, tuned)]):
                    _scan_nonfinite(pair, keys[index + 1:], trackers)
                del base, tuned  # a finite pair whose difference overflowed: the engine names the layer
            for task in by_key[key]:
                result = extract_layer(task, delta, options)
                result.seconds += read_seconds / len(by_key[key])
                results.append(result)
            since_trim += delta.numel() * delta.element_size()
            del delta
            if since_trim >= TRIM_EVERY_BYTES:
                with stage("release freed memory"):
                    release_freed_memory()
                since_trim = 0
    release_freed_memory()
    return results


class PairPrefetcher:
    """Reads each key's (base, tuned) pair and forms its float32 difference one key ahead, on one thread.

    `take(key)` gives (difference, finite, seconds) for the keys in the order given and starts the next
    one; at most two differences exist at a time (the one being worked on and the next). `stop()`
    waits for the read in flight and reads nothing more (then `take` works on the calling thread).
    """

    def __init__(self, pair: CheckpointPair, keys: list[str], options: ExtractOptions):
        from concurrent.futures import ThreadPoolExecutor

        self.pair, self.keys, self.options = pair, keys, options
        self._next = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending = None
        self._submit()

    def __enter__(self) -> PairPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _submit(self) -> None:
        if self._pool is not None and self._next < len(self.keys):
            self._pending = (self.keys[self._next], self._pool.submit(self._load, self.keys[self._next]))
            self._next += 1

    def _load(self, key: str) -> tuple[torch.Tensor, bool, float]:
        start = time.perf_counter()
        with stage("read"):
            base, tuned = self.pair.read(key)
        with stage("subtract (float32)"):
            delta = difference(base, tuned, self.options)
        del base, tuned
        with stage("finite check (one sum)"):
            # NaN/inf in either input make the difference NaN/inf (is_finite: one sum, exact when it overflows)
            finite = is_finite(delta)
        return delta, finite, time.perf_counter() - start

    def take(self, key: str) -> tuple[torch.Tensor, bool, float]:
        if self._pending is not None and self._pending[0] == key:
            with stage("wait for the prefetched pair"):
                out = self._pending[1].result()
            self._pending = None
        else:  # stopped (or asked out of order): read here
            out = self._load(key)
            self._next = self.keys.index(key) + 1
        self._submit()
        return out

    def stop(self) -> None:
        if self._pool is not None:
            if self._pending is not None:
                self._pending[1].cancel()
                self._pending = None
            self._pool.shutdown(wait=True)
            self._pool = None


def _scan_nonfinite(pair: CheckpointPair, keys: Iterable[str], trackers: tuple[NonFiniteTracker, ...]) -> None:
    """Check the remaining keys of both models (no maths), then refuse naming each file's NaN/inf tensors."""
    for key in keys:
        for tracker, tensor in zip(trackers, pair.read(key)):
            tracker.check(key, tensor)
    for tracker in trackers:
        tracker.finish()
