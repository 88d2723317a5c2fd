"""Where and how a run executes: device, mixed precision, seeding, torchrun, stop signals, the
GPU slot a launcher's worker process keeps.

Nothing here knows about models or data; `train.py` starts a `Runtime` once and hands its parts
to the functions that need them.
"""

import fcntl
import itertools
import logging
import os
import platform
import random
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("cxr")

# of a GPU's memory, what its packed sweep jobs divide equally among themselves (cxr.placement plans
# each job's splits within its part); the rest is left to the CUDA contexts
MEMORY_SHARE = 0.95


class DeviceError(Exception):
    """The asked-for device is not on this machine: reported as one line."""


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, then MPS, then the CPU; an explicit name must exist on this machine.

    A CUDA device always comes with its index (see `cuda_device`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name} asked for, but torch sees no CUDA GPU here; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name} asked for, but MPS is not available here; use auto or cpu")
    if device.type == "cuda":
        return cuda_device(name, torchrun_local_rank(), torch.cuda.current_device(), torch.cuda.device_count())
    return device


def torchrun_local_rank() -> int | None:
    """This process's GPU number on its node under torchrun with several processes, else None."""
    return int(os.environ.get("LOCAL_RANK", 0)) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None


def cuda_device(name: str, local_rank: int | None, current: int, gpu_count: int) -> torch.device:
    """The indexed CUDA device (`cuda:N`) that trainer.device `name` (cuda or cuda:N) means here.

    torch's per-device calls (set_per_process_memory_fraction, set_device) refuse a bare `cuda`
    ("Expected a torch.device with a specified index"), so no run holds one. Under torchrun each
    rank takes its own GPU, `local_rank`; else cuda:N is GPU N, and `cuda` the current device
    (`current`: 0 unless set_device said otherwise; a job that sees only its own GPU, as Ray and
    SLURM give it, sees it as 0).
    """
    if local_rank is not None:
        index, source = local_rank, f"torchrun's local rank {local_rank}"
    else:
        index, source = torch.device(name).index, f"device {name}"
        index = current if index is None else index
    if index >= gpu_count:
        raise DeviceError(f"{source} needs GPU {index}, but this machine has {gpu_count} GPU(s)")
    return torch.device("cuda", index)


GPU_SLOTS = Path(tempfile.gettempdir()) / f"cxr-gpu-slots-{os.getuid()}"
_held_slots: dict[Path, tuple[int, IO]] = {}  # folder -> (slot, its locked file), for the process's life


def claim_gpu_slot(folder: Path = GPU_SLOTS) -> int:
    """The lowest slot number under `folder` that no live process holds, held by this process for
    the rest of its life (the same number on every call).

    Launchers that reuse worker processes (joblib) hand a job to whichever worker is free, so a
    GPU chosen by job number can get two jobs while another idles. A worker that keeps its slot
    keeps its GPU. The slot is a lock (flock) on `slot-N.lock`: the kernel releases it when the
    process ends, however it ends, and the next process to ask takes the freed number.
    """
    folder = Path(folder)
    if folder in _held_slots:
        return _held_slots[folder][0]
    folder.mkdir(parents=True, exist_ok=True)
    for slot in itertools.count():
        handle = open(folder / f"slot-{slot}.lock", "a")  # noqa: SIM115 (kept open: it holds the lock)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_slots[folder] = (slot, handle)
        return slot


def slot_device(device: str, slot: int, gpu_count: int) -> str:
    """trainer.device for a sweep job run by the process holding GPU slot `slot` (`claim_gpu_slot`).

    Launchers that run jobs side by side (joblib, submitit_local) would start every job on GPU 0:
    slot s takes GPU s mod gpu_count instead, so of n processes side by side each GPU serves n /
    gpu_count, rounded up or down (per_gpu: n_jobs = GPU count x jobs_per_gpu, jobs_per_gpu each).
    An explicit cuda:N or cpu is kept, and so is `auto` on a machine with one GPU (or a cluster
    task that sees only its own).
    """
    if device in ("auto", "cuda") and gpu_count > 1:
        return f"cuda:{slot % gpu_count}"
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def amp_mode(mode: str, device_type: str, capability: tuple[int, int] | None) -> str:
    """off | bf16 | fp16: what trainer.amp=`mode` runs on a device of `device_type` (and, for CUDA,
    compute `capability`).

    auto: bf16 from compute capability 8.0 on (A100 8.0, H100 9.0), whose tensor cores run it;
    fp16 with a GradScaler before (T4 7.5, V100 7.0), where bf16 is emulated and slow, although
    torch.cuda.is_bf16_supported() says yes (it counts emulation). Never on the CPU unless asked:
    bf16 autocast on an AVX2 CPU is ~15x slower than fp32.
    """
    if mode != "auto":
        return mode
    if device_type != "cuda":
        return "off"
    return "bf16" if capability >= (8, 0) else "fp16"


def amp_setup(mode: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """autocast dtype and GradScaler for trainer.amp=`mode` on `device` (see `amp_mode`)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    mode = amp_mode(mode, device.type, capability)
    if mode == "off":
        return None, None
    if mode == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device.type)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # set both ways: these are process-wide, and an earlier run() in this process must not leak.
    # warn_only: on CUDA some kernels a run needs have no deterministic version and would raise
    # (cross-entropy's NLLLoss, AdaptiveAvgPool2d's backward for pooling=avg: torch's
    # use_deterministic_algorithms docs); they run, with torch's warning in the log, so a GPU
    # run is repeatable only up to them. On the CPU it is exact.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # fixed input sizes: let cuDNN pick the fastest kernels once, unless results must not vary
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def rng_state(device: torch.device) -> dict:
    """This process's random generators, as tensors and lists (checkpoints load weights_only)."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        # the whole MT19937 state, including the cached second Gaussian of a Box-Muller pair
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        # the generator of the GPU this process trains on (under torchrun: its own, not GPU 0's)
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    py = state["python"]
    random.setstate((3, tuple(py[:-1]), py[-1] or None))
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def init_distributed(device_cfg: str) -> tuple[int, int]:
    """(rank, world size); under torchrun joins the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    use_cuda = device_cfg != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.get_rank() != 0:  # every rank runs the same steps: rank 0 reports them, once
        log.setLevel(logging.WARNING)
    return dist.get_rank(), dist.get_world_size()


def gpu_memory_mb(peak_allocated: int, peak_reserved: int, device_used: int, reserved: int,
                  shared: bool) -> dict:
    """A run's GPU memory in MiB, from byte counts: its tensors' peak (`peak_allocated`), the caching
    allocator's peak (`peak_reserved`: what the GPU had to give it), and the memory outside the
    allocator, `device_used` (the whole device's, cudaMemGetInfo) less `reserved` (the allocator's,
    at the same moment): the CUDA context, cuBLAS/cuDNN handles and loaded kernels, several hundred
    MiB, which set_per_process_memory_fraction does not limit and packed jobs each add on top of
    their reserved peak. That estimate is None on a `shared` GPU (packed jobs), whose other
    processes' memory cannot be told from this one's without NVML.
    """
    def mib(count: int) -> float:
        return round(count / 2**20, 1)

    return {"peak_allocated": mib(peak_allocated), "peak_reserved": mib(peak_reserved),
            "cuda_context_estimate": None if shared else mib(device_used - reserved)}


@dataclass
class Runtime:
    """One process's place in a run: its device and precision, its rank among torchrun's."""

    device: torch.device
    rank: int
    world: int
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    jobs_per_gpu: int = 1
    stop_group: dist.ProcessGroup | None = None  # a CPU (gloo) group for agreeing on stopping

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, TensorBoard and result.json."""
        return self.rank == 0

    def shared(self, value):
        """Rank 0's `value` on every rank (e.g. its Hydra output dir: the real one)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order."""
        if self.world == 1:
            return [value]
        values: list = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def agreed_stop(self, received: str | None) -> str | None:
        """The signal that stops the run (SIGTERM, ...), the same on every rank: any rank's.

        Every rank calls this at the same points. A rank that stopped alone would leave the others
        waiting in their next collective (DDP's gradient all-reduce, the gather of last.pt) for
        ever; agreed, all stop after the same step. The flag crosses a CPU (gloo) group, so asking
        does not wait for the GPU's queued work.
        """
        if self.world == 1:
            return received
        number = torch.tensor(signal.Signals[received].value if received else 0)
        dist.all_reduce(number, op=dist.ReduceOp.MAX, group=self.stop_group)
        return signal.Signals(int(number)).name if int(number) else None

    def gpu_memory_mb(self) -> dict | None:
        """This process's GPU memory since start() (`gpu_memory_mb`); None off CUDA."""
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return gpu_memory_mb(torch.cuda.max_memory_allocated(self.device), torch.cuda.max_memory_reserved(self.device),
                             total - free, torch.cuda.memory_reserved(self.device), shared=self.jobs_per_gpu > 1)

    def wrap(self, module: torch.nn.Module, compile_model: bool) -> torch.nn.Module:
        """`module` as it trains: under DistributedDataParallel with several ranks, compiled if asked."""
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
        return torch.compile(module) if compile_model else module


def start(trainer_cfg, seed: int, jobs_per_gpu: int = 1) -> Runtime:
    """Join torchrun's group if there is one, pick the device, seed every generator."""
    rank, world = init_distributed(trainer_cfg.device)
    device = pick_device(trainer_cfg.device)
    if device.type == "cuda":
        # cuda:N: autocast, cuDNN and every call without a device follow it, not GPU 0
        torch.cuda.set_device(device)
        if jobs_per_gpu > 1:
            # packed sweep jobs: an equal share of the GPU's memory each (cuDNN's autotuner then also
            # picks kernels whose workspace fits the share), so that no job starves the others
            torch.cuda.set_per_process_memory_fraction(MEMORY_SHARE / jobs_per_gpu, device)
        # a launcher's worker runs job after job: each peak is its own
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(seed, trainer_cfg.deterministic)
    stop_group = dist.new_group(backend="gloo") if world > 1 else None
    return Runtime(device, rank, world, *amp_setup(trainer_cfg.amp, device), jobs_per_gpu, stop_group)


@contextmanager
def cpu_threads(count: int | None, device: torch.device) -> Iterator[None]:
    """torch's intra-op CPU threads set to `count` for the block when `device` is the CPU."""
    previous = torch.get_num_threads()
    if count is not None and device.type == "cpu":
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class StopSignals:
    """SIGINT/SIGTERM inside the `with` block set `.received` instead of killing the process.

    The training loop checks it after each step: the epoch stops, last.pt of the last whole epoch
    is kept, and the run ends as `interrupted`. The previous handlers come back on leaving the
    block, however it is left. Outside the main thread (some launchers) signals stay as they are.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
