"""The CUDA-only decisions of a run, as pure functions fed the numbers of real GPUs (an H100 is
compute capability 9.0 with 80 GB, an A100 8.0, a T4 7.5), and the paths around them that a CPU
can run for real: evaluation in float32, DDP gradient accumulation, the fp16 scaler's skipped
steps, joblib workers' GPU slots (issue 24)."""

import csv
import json
import time
from pathlib import Path

import joblib
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.cuda._utils import _get_device_index
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from cxr.checkpoint import load_classifier
from cxr.config import ray_job_cpus, ray_job_gpus, ray_unschedulable
from cxr.engine import train_one_epoch
from cxr.predict import classify
from cxr.runtime import DeviceError, amp_mode, claim_gpu_slot, cuda_device, gpu_memory_mb, slot_device
from cxr.task import Task
from cxr.train import run

BINARY = Task("binary", ("NORMAL", "PNEUMONIA"))


# ---------------------------------------------------------------------------------------------
# Item 1: every CUDA device a run holds has an index


@pytest.mark.parametrize(("name", "local_rank", "current", "gpus", "expected"), [
    ("cuda", None, 0, 1, 0),  # trainer.device=auto on a one-GPU H100 host (and every Ray/SLURM job)
    ("cuda", None, 2, 8, 2),  # after torch.cuda.set_device(2)
    ("cuda:3", None, 0, 8, 3),  # a per_gpu sweep job's slot device on an 8-GPU host
    ("cuda", 5, 5, 8, 5),  # torchrun: each rank its local rank's GPU
    ("cuda:0", 1, 1, 2, 1),  # torchrun with an explicit cuda:0: the ranks must not share one GPU
])
def test_issue24_item1_cuda_devices_carry_an_index(name, local_rank, current, gpus, expected):
    device = cuda_device(name, local_rank, current, gpus)
    assert device == torch.device("cuda", expected)
    # torch's own check in set_per_process_memory_fraction (and set_device): passes with an index...
    assert _get_device_index(device) == expected
    # ...where the bare device that packed jobs on a one-GPU host used to get is refused
    with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
        _get_device_index(torch.device("cuda"))


def test_issue24_item1_a_gpu_the_machine_lacks_is_one_line():
    with pytest.raises(DeviceError, match=r"device cuda:2 needs GPU 2, but this machine has 2 GPU\(s\)"):
        cuda_device("cuda:2", None, 0, 2)
    with pytest.raises(DeviceError, match="torchrun's local rank 4 needs GPU 4, but this machine has 4"):
        cuda_device("cuda", 4, 0, 4)


# ---------------------------------------------------------------------------------------------
# Item 6: evaluation in float32, as predict


def micro_units(value: str) -> int:
    return round(float(value) * 1e6)


def test_issue24_item6_evaluate_gives_predicts_probabilities_under_bf16_autocast(make_cfg, tmp_path):
    """A run trained under bf16 autocast: the test probabilities its evaluate() wrote (for the
    images of test_predictions.csv, with best.pt's weights) are cxr.predict's for the same files
    and best.pt, to the CSV's 1e-6 (evaluated in bf16 they differed by up to 7.6e-4)."""
    run(make_cfg("debug=smoke", "model=resnet18", "trainer.amp=bf16", "trainer.epochs=1", "trainer.bootstrap=0",
                 "trainer.tensorboard_images=false", "data.limit=24"), tmp_path)
    with (tmp_path / "test_predictions.csv").open() as f:
        evaluated = list(csv.DictReader(f))
    model, task, settings = load_classifier(tmp_path / "best.pt", torch.device("cpu"))
    predicted = classify(model, task, settings, [Path(row["path"]) for row in evaluated], torch.device("cpu"))
    assert [row["path"] for row in predicted] == [row["path"] for row in evaluated]
    for ours, theirs in zip(evaluated, predicted, strict=True):
        for column in ("prob_NORMAL", "prob_PNEUMONIA"):
            assert abs(micro_units(ours[column]) - micro_units(theirs[column])) <= 1, (column, ours, theirs)


# ---------------------------------------------------------------------------------------------
# Item 7: automatic mixed precision from the compute capability


@pytest.mark.parametrize(("mode", "device_type", "capability", "expected"), [
    ("auto", "cuda", (9, 0), "bf16"),  # H100
    ("auto", "cuda", (8, 0), "bf16"),  # A100
    ("auto", "cuda", (8, 6), "bf16"),  # A10 / RTX 30xx
    ("auto", "cuda", (7, 5), "fp16"),  # T4: is_bf16_supported() says True (emulated)
    ("auto", "cuda", (7, 0), "fp16"),  # V100
    ("auto", "cpu", None, "off"),  # ~15x slower than fp32 on an AVX2 CPU
    ("auto", "mps", None, "off"),
    ("bf16", "cuda", (7, 5), "bf16"),  # asked for: kept
    ("bf16", "cpu", None, "bf16"),
    ("off", "cuda", (9, 0), "off"),
])
def test_issue24_item7_amp_auto_follows_the_compute_capability(mode, device_type, capability, expected):
    assert amp_mode(mode, device_type, capability) == expected


# ---------------------------------------------------------------------------------------------
# Item 7: DDP all-reduces once per optimizer step with gradient accumulation


def ddp_accumulation_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: DDP over a linear layer, 6 batches, accumulate_steps=3, a comm hook counting the
    gradient all-reduces; writes the count and the final weights."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    ddp = nn.parallel.DistributedDataParallel(model)
    calls = []

    def counting_allreduce(process_group, bucket):
        calls.append(1)
        return allreduce_hook(process_group, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = rank_batches(rank)
    train_one_epoch(ddp, optimizer, batches, BINARY, device=torch.device("cpu"), epoch=1, total=len(batches),
                    progress=False, accumulate_steps=3)
    Path(out_dir, f"{rank}.json").write_text(json.dumps({"all_reduces": len(calls),
                                                         "weight": model.weight.tolist(), "bias": model.bias.tolist()}))
    dist.destroy_process_group()


def rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(5, 4, generator=generator), torch.randint(0, 2, (5,), generator=generator))
            for _ in range(6)]


@pytest.mark.slow  # ~16 s: two processes start and import torch
def test_issue24_item7_ddp_accumulation_all_reduces_once_per_optimizer_step(tmp_path):
    """2 gloo ranks, 6 batches each, accumulate_steps=3: 2 optimizer steps, so 2 all-reduces (not
    6), and the weights are those of one process stepping on both ranks' batches together."""
    mp.spawn(ddp_accumulation_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [r["all_reduces"] for r in ranks] == [2, 2]
    # the oracle: plain SGD, each micro-batch the two ranks' batches side by side (equal sizes: the
    # mean of the ranks' mean losses is the mean over both), each loss / 3, a step every 3 batches
    torch.manual_seed(0)
    single = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(single.parameters(), lr=0.1)
    for index, ((x0, y0), (x1, y1)) in enumerate(zip(rank_batches(0), rank_batches(1), strict=True), start=1):
        (nn.functional.cross_entropy(single(torch.cat([x0, x1])), torch.cat([y0, y1])) / 3).backward()
        if index % 3 == 0:
            optimizer.step()
            optimizer.zero_grad()
    for r in ranks:
        assert torch.tensor(r["weight"]) == pytest.approx(single.weight.detach(), abs=1e-6)
        assert torch.tensor(r["bias"]) == pytest.approx(single.bias.detach(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Item 7: the learning-rate schedule follows the steps the fp16 scaler took


def test_issue24_item7_scheduler_steps_only_when_the_scaler_stepped():
    """A GradScaler (on the CPU, as on a GPU) whose first scales overflow the gradients skips
    those optimizer steps; Adam's own step count says how many it took, and the scheduler must
    have stepped exactly as often (before: once per group, skipped or not)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    # 2**127 x gradients of inputs ~100 overflow float32; the scale halves after each overflow
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    batches = [(torch.randn(8, 4) * 100, torch.randint(0, 2, (8,))) for _ in range(20)]
    out = train_one_epoch(model, optimizer, batches, BINARY, device=torch.device("cpu"), epoch=1,
                          scaler=scaler, total=len(batches), progress=False, scheduler=scheduler)
    taken = int(optimizer.state[model.weight]["step"])
    assert 0 < taken < len(batches)  # some skipped, some taken
    assert scheduler.last_epoch == taken
    assert len(out["lrs"]) == taken
    assert out["lrs"] == pytest.approx([1e-3 / (1 + step) for step in range(taken)])


# ---------------------------------------------------------------------------------------------
# Item 7: a joblib worker keeps its GPU


def job_on_slot(folder: str, gpus: int, seconds: float) -> tuple[str, float, float]:
    """A sweep job as a joblib worker runs it: its device from its process's slot, then work."""
    device = slot_device("auto", claim_gpu_slot(Path(folder)), gpus)
    started = time.monotonic()
    time.sleep(seconds)
    return device, started, time.monotonic()


@pytest.mark.slow  # ~15 s: two loky workers start and import torch
def test_issue24_item7_each_joblib_worker_keeps_its_gpu_slot(tmp_path):
    """2 GPUs, 2 joblib (loky) workers, a long first job and short others: the worker that runs
    the short ones takes job after job while the long one runs. By job number, job 2 would go
    to GPU 0 beside job 0; by slot, no GPU ever holds two jobs at once and both are used."""
    seconds = [2.5] + [0.2] * 7
    with joblib.parallel_backend("loky"):
        jobs = joblib.Parallel(n_jobs=2, batch_size=1)(
            joblib.delayed(job_on_slot)(str(tmp_path), 2, s) for s in seconds)
    assert {device for device, _, _ in jobs} == {"cuda:0", "cuda:1"}
    for i, (device, start, end) in enumerate(jobs):
        for other_device, other_start, other_end in jobs[i + 1:]:
            overlap = start < other_end and other_start < end
            assert not (overlap and device == other_device), jobs


def test_issue24_item7_a_slot_is_held_for_the_process_life_and_freed_at_its_end(tmp_path):
    """Slots are the lowest free numbers; a process asks again and gets the same one; a slot held
    by a process that has ended is free for the next."""
    ctx = mp.get_context("spawn")
    assert claim_gpu_slot(tmp_path) == 0 and claim_gpu_slot(tmp_path) == 0  # this process: slot 0
    with ctx.Pool(1) as pool:
        assert pool.apply(claim_gpu_slot, (tmp_path,)) == 1  # another live process: the next
    with ctx.Pool(1) as pool:  # the first pool's worker has ended: its slot is free again
        assert pool.apply(claim_gpu_slot, (tmp_path,)) == 1


# ---------------------------------------------------------------------------------------------
# Item 7: GPU memory, reserved and outside the allocator


def test_issue24_item7_gpu_memory_reports_reserved_memory_and_the_context():
    """An H100 job: tensors peaked at 3 GiB, the allocator at 4.5 GiB; at the end 79.6 GiB device
    total, 4.25 GiB in use, 3.75 GiB of it the allocator's: 512 MiB outside it (the CUDA context)."""
    gib = 2**30
    alone = gpu_memory_mb(3 * gib, int(4.5 * gib), int(4.25 * gib), int(3.75 * gib), shared=False)
    assert alone == {"peak_allocated": 3072.0, "peak_reserved": 4608.0, "cuda_context_estimate": 512.0}
    packed = gpu_memory_mb(3 * gib, int(4.5 * gib), int(20 * gib), int(3.75 * gib), shared=True)
    assert packed == {"peak_allocated": 3072.0, "peak_reserved": 4608.0, "cuda_context_estimate": None}


# ---------------------------------------------------------------------------------------------
# Issue 20 item 7: Ray jobs sized from the machine (the presets compose in tests/test_ray.py)


@pytest.mark.parametrize(("cpus", "gpus", "jobs_per_gpu", "expected"), [
    (2, 0, 1, (2, 0)),  # this CI machine: 2 cores, no GPU
    (16, 1, 1, (4, 1)),  # an H100 host: 16 cores, 1 GPU
    (16, 1, 2, (4, 0.5)),  # two packed jobs per GPU
    (64, 8, 4, (4, 0.25)),
])
def test_issue20_item7_ray_jobs_are_sized_from_the_machine(cpus, gpus, jobs_per_gpu, expected):
    assert (ray_job_cpus(cpus), ray_job_gpus(gpus, jobs_per_gpu)) == expected
    assert ray_unschedulable({"num_cpus": expected[0], "num_gpus": expected[1]},
                             {"num_cpus": cpus, "num_gpus": gpus}) is None


def test_issue20_item7_a_ray_job_larger_than_the_instance_is_one_line_naming_the_key():
    problem = ray_unschedulable({"num_cpus": 4, "num_gpus": 1}, {"num_cpus": 2, "num_gpus": 0})
    assert problem == ("each Ray job asks for 4 CPU(s) (hydra.launcher.ray.remote.num_cpus) but the Ray instance "
                       "has 2 (hydra.launcher.ray.init.num_cpus): set hydra.launcher.ray.remote.num_cpus=2")
    problem = ray_unschedulable({"num_cpus": 1, "num_gpus": 1}, {"num_cpus": 2, "num_gpus": 0})
    assert problem.endswith("set hydra.launcher.ray.remote.num_gpus=0")
    assert ray_unschedulable({}, {"num_cpus": 1, "num_gpus": 0}) is None  # Ray's defaults: 1 CPU, no GPU
