"""How every suite measures and records: wall time, alternating medians, GPU busy time, peak memory,
the machine it ran on, and the JSON file a suite writes.

The alternatives a suite compares run in turns within each round (`side_by_side`), so noise from
other processes on a shared machine hits them alike, and each figure is a median of rounds. Each
alternative returns how many images it handled, so an img/s is what was counted, never assumed.
"""

import json
import math
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from cxr.files import atomic_write
from cxr.runtime import device_name

NO_CUDA = "no CUDA device"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn(), the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def side_by_side(fns: dict[str, Callable[[], int]], repeats: int, device: torch.device) -> dict[str, dict]:
    """Each function run `repeats` times, the functions alternating within every round: per name,
    the median seconds, the images one call handled (what it returned) and their img/s."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    images: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            result: list[int] = []
            seconds[name].append(timed(lambda fn=fn, result=result: result.append(fn()), device))
            images[name] = result[0]
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    return {name: {"s": medians[name], "images": images[name], "img_s": images[name] / medians[name]}
            for name in fns}


def busy_fraction(fn: Callable[[], object], device: torch.device) -> float:
    """Share of fn's wall time in which the GPU ran something (union of kernel and copy spans)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:  # no CPU events: little overhead
        wall_s = timed(fn, device)
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    busy_us, covered_to = 0.0, -math.inf
    for start, end in spans:  # overlapping spans (several streams) count once
        if end > covered_to:
            busy_us += end - max(start, covered_to)
            covered_to = end
    return min(1.0, busy_us / 1e6 / wall_s)


class BusySampler:
    """Mean GPU busy fraction while the block runs: torch.cuda.utilization (NVML: the share of the
    last sample period in which any kernel ran on the GPU) read every `every` seconds. NVML sees
    the sweep's worker processes, which a profiler in this process cannot."""

    def __init__(self, device: torch.device, every: float = 0.5):
        self.device, self.every = device, every
        self.samples: list[float] = []
        self.reason: str | None = NO_CUDA if device.type != "cuda" else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "BusySampler":
        if self.reason is None:
            try:
                torch.cuda.utilization(self.device)
            except Exception as error:  # no NVML bindings, or a driver that does not answer them
                self.reason = f"torch.cuda.utilization: {type(error).__name__}: {error}".splitlines()[0]
            else:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(torch.cuda.utilization(self.device) / 100)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            if not self.samples:
                self.reason = "the block ended before the first sample"

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def peak_rss_mb(who: int) -> float:
    """Peak RSS in MB of this process (VmHWM, which /proc/self/clear_refs resets) or of its waited
    children (resource.RUSAGE_CHILDREN)."""
    if who == resource.RUSAGE_SELF and Path("/proc/self/status").exists():
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux (bytes on macOS)


def machine(device: torch.device) -> dict:
    """The head of every suite's JSON: what it ran on."""
    return {"device": device_name(device), "torch": torch.__version__,
            "cpu": {"cores": os.cpu_count(), "threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine()}}


def save_json(report: dict, out: Path) -> None:
    """The suite's JSON, whole at every moment: a suite rewrites it after each section, and a kill
    at any point leaves the last one written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out, lambda file: file.write(text.encode()))


def show(section: str, figures: dict, *keys: str) -> None:
    """One printed line of a section's figures (and its ratios)."""
    shown = "  |  ".join(f"{key} {figures[key]:.4g}" for key in keys)
    ratios = "".join(f"  {key} {value:.2f}x" for key, value in figures.items() if "_vs_" in key)
    print(f"{section:7s}@{figures['size']} px  {shown}{ratios}", flush=True)


def publish(report: dict, out: Path) -> None:
    """The suite's JSON written, its targets printed (ok or MISS), and where it went."""
    save_json(report, out)
    for target, ok in report.get("targets", {}).items():
        print(f"{'ok  ' if ok else 'MISS'} {target}")
    print(f"written to {out}", flush=True)
