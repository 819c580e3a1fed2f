"""Shared helpers of the benchmark scripts: timing, machine description, roofline, memory,
and the reports.

Every script in ``benchmarks/`` reports the same machine facts (device, CPU, ISA, threads,
versions, timestamp) and times callables the same way (warm-up, then per-call seconds
with median/min/max), so those pieces live here once. Scripts stay runnable as
``python benchmarks/<name>.py``: they import this module by file location.

Reports: a script hands its report to ``save_report``, which writes the JSON (by default
``benchmarks/results/<name>.json``) and regenerates ``RESULTS.md`` from every report
beside it (``write_results_md``). Measured numbers live there and nowhere else.
"""
from __future__ import annotations

import ctypes
import datetime
import json
import glob
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time

import torch


HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")


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


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa() -> str:
    """The widest vector ISA of this CPU ("AVX2", "AVX-512", plus "AMX" when present),
    from /proc/cpuinfo, else the capability PyTorch dispatches to."""
    flags = cpu_flags()
    if "avx512f" in flags:
        isa = "AVX-512"
    elif "avx2" in flags:
        isa = "AVX2"
    else:
        isa = {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability(),
                                                      torch.backends.cpu.get_cpu_capability())
    if "amx_tile" in flags:
        isa += " + AMX"
    return isa


# fp32 FMA lanes per core and cycle: the vector width in floats times two FMA units, the
# count of the server cores these benchmarks run on (Zen 2-4, Skylake-SP and later Xeons).
FMA_LANES = {"AVX2": 8 * 2, "AVX-512": 16 * 2}


def cpu_max_mhz() -> tuple[float | None, str]:
    """The CPU's highest clock in MHz and where it came from: cpufreq's cpuinfo_max_freq,
    else lscpu's "CPU max MHz", else the largest "cpu MHz" of /proc/cpuinfo (the current
    clock; under a hypervisor often the nominal one)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1000.0, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("CPU max MHz"):
                return float(line.split(":", 1)[1]), "lscpu CPU max MHz"
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":", 1)[1]) for line in f if line.startswith("cpu MHz")]
        if mhz:
            return max(mhz), "/proc/cpuinfo cpu MHz (current clock, no max reported)"
    except (OSError, ValueError):
        pass
    return None, "unknown"


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo, else os.cpu_count()."""
    cores, phys = set(), "0"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    cores.add((phys, line.split(":", 1)[1].strip()))
    except OSError:
        pass
    return len(cores) or os.cpu_count() or 1


def fma_peak(threads: int) -> dict | None:
    """The ISA's theoretical fp32 peak for ``threads`` threads: cores x GHz x FMA lanes x 2
    (an FMA is two FLOPs), with the inputs and their assumptions; None off x86 or without
    a clock."""
    isa = cpu_isa().split(" + ")[0]
    mhz, source = cpu_max_mhz()
    if isa not in FMA_LANES or mhz is None:
        return None
    cores = min(threads, physical_cores())
    return dict(gflops=cores * mhz / 1000.0 * FMA_LANES[isa] * 2, cores=cores, ghz=mhz / 1000.0,
                fma_lanes=FMA_LANES[isa], isa=isa, clock_source=source,
                assumption=f"{FMA_LANES[isa] // 2} fp32 lanes x 2 FMA units per core at the clock from "
                           f"{source}, one thread per physical core (SMT siblings share the units); "
                           "a turbo clock above it or a 1-FMA-unit part makes the true peak differ")


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
    device = torch.device(device)
    return dict(device=str(device), device_name=device_name(device), cpu=cpu_name(), isa=cpu_isa(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton_version(), python=platform.python_version(),
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat())


def add_run_options(ap) -> None:
    """The --warmup / --threads / --json options of the extension benchmarks."""
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: keep)")
    ap.add_argument("--json", default=None, metavar="PATH", help=JSON_HELP)


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


# ------------------------------------------------------------------ reports and RESULTS.md
JSON_HELP = ("write the JSON report here instead of benchmarks/results/<name>.json; RESULTS.md "
             "is then regenerated beside it, from the reports in that folder")


def save_report(name: str, report: dict, path: str | None = None, argv: list[str] | None = None,
                columns: list[tuple[str, str]] | None = None, device=None) -> str:
    """Write benchmark ``name``'s ``report`` as JSON and regenerate RESULTS.md; return the path.

    Adds ``report["run"]``: the command (``python benchmarks/<name>.py`` + ``argv``, default
    ``sys.argv[1:]``) and the machine (``machine_info``). ``report["results"]`` (or
    ``report["rows"]``) is the list of row dicts the table shows; ``columns`` picks and
    names its columns as (key, header) pairs (default: every scalar key). ``path`` None:
    ``benchmarks/results/<name>.json``, and RESULTS.md goes to ``benchmarks/RESULTS.md``;
    else RESULTS.md goes beside ``path``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if device is None:
        device = report.get("device", "cpu")
    report["benchmark"] = name
    report["run"] = dict(command=shlex.join(["python", f"benchmarks/{name}.py", *argv]),
                         **machine_info(torch.device(device)))
    if columns is not None:
        report["table_columns"] = [list(c) for c in columns]
    path = path or os.path.join(RESULTS_DIR, f"{name}.json")
    write_json(path, report)
    md = write_results_md(os.path.dirname(os.path.abspath(path)))
    print(f"wrote {path} and {md}")
    return path


def write_results_md(json_dir: str = RESULTS_DIR, out: str | None = None) -> str:
    """(Re)generate RESULTS.md from the reports (``save_report`` JSON) in ``json_dir``.

    One section per benchmark: the exact command, the machine (CPU model, ISA, threads,
    torch version, date) and the table. ``out`` defaults to ``benchmarks/RESULTS.md`` for
    ``benchmarks/results`` and to ``json_dir/RESULTS.md`` for any other folder. Files that
    are not such reports are skipped. Returns the path written.
    """
    json_dir = os.path.abspath(json_dir)
    if out is None:
        out = RESULTS_MD if json_dir == os.path.abspath(RESULTS_DIR) else os.path.join(json_dir, "RESULTS.md")
    reports = []
    for p in sorted(glob.glob(os.path.join(json_dir, "*.json"))):
        try:
            with open(p) as f:
                rep = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rep, dict) and isinstance(rep.get("run"), dict) and "command" in rep["run"]:
            reports.append(rep)
    reports.sort(key=lambda r: (r.get("benchmark") != "throughput", str(r.get("benchmark"))))
    where = os.path.relpath(json_dir, os.path.dirname(HERE))
    if where.startswith(".."):
        where = json_dir
    lines = ["# Benchmark results", "",
             f"Generated by `benchmarks/_harness.py` (`write_results_md`) from the JSON reports in "
             f"`{where}/`; rerun a benchmark to update its section. Numbers from different machines "
             "or loads are not comparable; within a section, providers ran in alternation in one "
             "process.", ""]
    for rep in reports:
        lines += _report_section(rep)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return out


def machine_line(run: dict) -> str:
    """"CPU model, ISA, N threads, torch X, date" (and the GPU on CUDA) of a report's run."""
    parts = [run.get("cpu") or run.get("device_name", "unknown CPU"), run.get("isa", "unknown ISA")]
    if str(run.get("device", "cpu")).startswith("cuda"):
        parts.insert(0, f"{run.get('device_name')} ({run['device']})")
    parts += [f"{run.get('threads')} threads", f"torch {run.get('torch')}",
              str(run.get("timestamp", ""))[:10]]
    return ", ".join(str(p) for p in parts if p)


def _report_section(rep: dict) -> list[str]:
    rows = rep.get("results")
    if rows is None:
        rows = rep.get("rows", [])
    rows = [r for r in rows if isinstance(r, dict)]
    columns = [tuple(c) for c in rep.get("table_columns") or []]
    if not columns:
        keys = []
        for r in rows:
            keys += [k for k, v in r.items() if k not in keys and (v is None or isinstance(v, (str, int, float)))]
        columns = [(k, k) for k in keys]
    if any("error" in r for r in rows) and "error" not in [k for k, _ in columns]:
        columns.append(("error", "error"))
    lines = [f"## {rep.get('benchmark')}", "", "```bash", rep["run"]["command"], "```", "",
             f"Machine: {machine_line(rep['run'])}", ""]
    if rows:
        lines.append("| " + " | ".join(h for _, h in columns) + " |")
        lines.append("|" + "---|" * len(columns))
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(k)) for k, _ in columns) + " |")
        lines.append("")
    for note in rep.get("notes") or []:
        lines.append(f"- {note}")
    if rep.get("notes"):
        lines.append("")
    return lines


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v).replace("|", "\\|").replace("\n", " ")
    if isinstance(v, int):
        return str(v)
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) >= 1e-3 or v == 0:
        return f"{v:.4g}"
    return f"{v:.2e}"


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


class Heartbeat:
    """While its block runs, calls ``say(seconds so far)`` every ``every`` seconds, so that a
    call which compiles for minutes shows that it is alive; a shorter block says nothing."""

    def __init__(self, say, every: float = 30.0):
        self.say, self.every = say, every
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        start = time.perf_counter()
        while not self._done.wait(self.every):
            self.say(time.perf_counter() - start)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


class CompileCache:
    """What torch.compile's on-disk caches did for the graphs compiled while its block ran:
    ``outcome`` is "none" (no graph compiled), else the worst of "bypass" (a cache refused a
    graph, which is then traced and compiled afresh in every process), "miss" (compiled afresh,
    then saved) and "hit" (every graph loaded from the cache), from AOTAutograd's and inductor's
    FX-graph cache counters."""

    _GROUPS = ("aot_autograd", "inductor")
    OUTCOMES = ("bypass", "miss", "hit")

    @classmethod
    def _counts(cls) -> dict[str, int]:
        """Per outcome, the sum of the groups' ``*cache_<outcome>`` counters so far."""
        from torch._dynamo.utils import counters
        return {o: sum(v for g in cls._GROUPS for k, v in counters[g].items() if k.endswith(f"cache_{o}"))
                for o in cls.OUTCOMES}

    def __enter__(self) -> "CompileCache":
        self._before, self.outcome = self._counts(), None
        return self

    def __exit__(self, *exc) -> None:
        after = self._counts()
        self.outcome = next((o for o in self.OUTCOMES if after[o] > self._before[o]), "none")


# Square GEMM sizes for the measured peak: the library's best rate moves with the size
# (blocking, threading), so the roofline is the best over several.
PEAK_SIZES = (512, 1024, 2048)


def matmul_rates(device="cpu", sizes=PEAK_SIZES, dtype=torch.float32, repeats: int = 10) -> dict[int, float]:
    """Measured square-GEMM rate in ``dtype`` (GFLOP/s per size, best of ``repeats``) with
    the current thread count; the peak is the largest.

    The best rather than the median: this is a roofline, the most the machine delivered,
    and other processes on a shared machine only ever lower it.
    """
    device = torch.device(device)
    rates = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(device)
        best = min(time_calls(lambda: a @ b, device) for _ in range(repeats))
        rates[n] = 2 * n ** 3 / best / 1e9
    return rates


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
