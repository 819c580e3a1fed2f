"""Shared helpers of the benchmark scripts: timing, machine description, roofline, memory.

Every script in ``benchmarks/`` reports the same machine facts (device, CPU, threads,
versions, timestamp) and times callables the same way (warm-up, then per-call seconds
with median/min/max), so those pieces live here once. Scripts stay runnable as
``python benchmarks/<name>.py``: they import this module by file location.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch


# ------------------------------------------------------------------ machine
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def machine_info(device: torch.device) -> dict:
    """The facts every benchmark JSON carries, so numbers from two runs can be compared."""
    return dict(device=str(device), device_name=device_name(device),
                threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton_version(), python=platform.python_version(),
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat())


def add_run_options(ap) -> None:
    """The --warmup / --threads / --json options of the extension benchmarks."""
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep)")
    ap.add_argument("--json", default=None, help="write machine-readable results here")


def start_extension_run(args) -> int:
    """Apply --threads; 0 when the C++ extension is built, else say why and return 2."""
    from dvpvae import _ext

    if args.threads:
        torch.set_num_threads(args.threads)
    if not _ext.available():
        print(f"extension unavailable: {_ext.missing_reason()}", file=sys.stderr)
        return 2
    return 0


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# ------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of ``repeats`` single calls after ``warmup`` untimed calls (CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timeit_interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time several providers in alternation (A B A B ...): on a shared machine the load
    changes by the second, and alternating exposes every provider to the same conditions."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def measure(fn, device, warmup=2, repeats=7, inner=None, budget_s=0.4):
    """Per-call seconds (median, min, max, inner) over ``repeats`` timings of ``inner`` calls.

    ``inner=None`` picks the number of calls per timing so that all timings together take
    about ``budget_s``: short ops are then timed over many calls, where the clock's
    resolution and Python overhead do not dominate. CUDA timings use events.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    if inner is None:
        t0 = time.perf_counter()
        fn()
        sync(device)
        one = max(time.perf_counter() - t0, 1e-6)
        inner = max(1, min(200, int(budget_s / (repeats * one))))
    samples = []
    for _ in range(repeats):
        samples.append(time_calls(fn, device, inner))
    return statistics.median(samples), min(samples), max(samples), inner


def time_calls(fn, device, inner: int = 1) -> float:
    """Seconds per call of ``inner`` back-to-back calls of ``fn`` (device-synchronised)."""
    device = torch.device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def matmul_peak_gflops(device="cpu", n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 square-GEMM rate (best of ``repeats``) with the current thread count.

    The best rather than the median: this is a roofline, the most the machine delivered,
    and other processes on a shared machine only ever lower it.
    """
    device = torch.device(device)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    best = min(time_calls(lambda: a @ b, device) for _ in range(repeats))
    return 2 * n ** 3 / best / 1e9


# ------------------------------------------------------------------ memory
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size of this process now (Linux /proc), or None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), if possible.

    Without this, memory freed by an earlier task stays resident in malloc's free lists and
    a later task can reuse it without raising RSS, so its peak would be under-reported.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory increase of the code inside ``with PeakMemory(device) as m:`` -> ``m.mb``.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry (tensors only).
    CPU: a thread samples the process RSS every ``interval`` seconds; the result is the
    highest sample minus the RSS at entry, after returning freed heap memory to the OS.
    It counts everything the process touches (tensors, allocator slack, oneDNN scratch,
    compiled-kernel buffers) and can miss a spike shorter than the sampling interval.
    ``mb`` is None where neither method is available (no /proc, no CUDA).
    """

    def __init__(self, device, interval: float = 0.001):
        self.device = torch.device(device)
        self.interval = interval
        self.mb: float | None = None
        self.peak_rss_mb: float | None = None  # absolute process RSS at the peak (CPU)

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        release_free_memory()
        self._base = rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        if self._base is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            r = rss_bytes()
            if r is not None and r > self._peak:
                self._peak = r
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2 ** 20
            return False
        if self._base is None:
            return False
        self._stop.set()
        self._thread.join()
        last = rss_bytes() or 0
        self._peak = max(self._peak, last)
        self.mb = (self._peak - self._base) / 2 ** 20
        self.peak_rss_mb = self._peak / 2 ** 20
        return False
