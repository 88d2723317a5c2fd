"""Where and how a run executes: device, mixed precision, seeding, torchrun, stop signals.

Nothing here knows about models or data; `train.py` starts a `Runtime` once and hands its parts
to the functions that need them.
"""

import logging
import os
import platform
import random
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
    """`auto`: CUDA, then MPS, then the CPU; an explicit name must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name} asked for, but torch sees no CUDA GPU here; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device {name} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name} asked for, but MPS is not available here; use auto or cpu")
    return device


def sweep_job_device(device: str, job_num: int, gpu_count: int, jobs_per_gpu: int = 1) -> str:
    """trainer.device for job `job_num` of a multirun on a machine with `gpu_count` GPUs.

    Launchers that run jobs side by side (joblib, submitit_local) would start every job on GPU 0:
    job n takes GPU (n // jobs_per_gpu) mod gpu_count instead, so with n_jobs = gpu_count x
    jobs_per_gpu each GPU holds at most jobs_per_gpu jobs at a time. An explicit cuda:N or cpu is
    kept, and so is `auto` on a machine with one GPU (or a cluster task that sees only its own).
    """
    if device in ("auto", "cuda") and gpu_count > 1:
        return f"cuda:{(job_num // jobs_per_gpu) % gpu_count}"
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def amp_setup(mode: str, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """autocast dtype and GradScaler. auto: bf16 on GPUs that have it, else fp16 with a scaler.

    Never on the CPU unless asked: bf16 autocast on an AVX2 CPU is ~15x slower than fp32.
    """
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None, None
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler(device.type)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # set both ways: these are process-wide, and an earlier run() in this process must not leak
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


@dataclass
class Runtime:
    """One process's place in a run: its device and precision, its rank among torchrun's."""

    device: torch.device
    rank: int
    world: int
    amp_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

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

    def peak_memory_mb(self) -> float | None:
        """The most GPU memory this process's tensors held since start() (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

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
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.index is not None:  # cuda:N: autocast, the bf16 check and cuDNN follow it, not GPU 0
        torch.cuda.set_device(device)
    if device.type == "cuda" and jobs_per_gpu > 1:
        # packed sweep jobs: an equal share of the GPU's memory each (cuDNN's autotuner then also
        # picks kernels whose workspace fits the share), so that no job starves the others
        torch.cuda.set_per_process_memory_fraction(MEMORY_SHARE / jobs_per_gpu, device)
    if device.type == "cuda":  # a launcher's worker runs job after job: each peak is its own
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(seed, trainer_cfg.deterministic)
    return Runtime(device, rank, world, *amp_setup(trainer_cfg.amp, device))


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
