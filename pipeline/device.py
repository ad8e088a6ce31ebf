"""The one device decision, and everything that follows from it.

`resolve_device` turns `--device auto|cpu|cuda[:N]` (and torchrun's LOCAL_RANK) into the
`torch.device` a process computes on; every module, buffer and batch is placed on that device
through `place` / `to_device`. The rest of this module is what the choice implies: the
process-group backend, bf16 autocast on CUDA, DataLoader options, and the storage device
(checkpoints hold CPU tensors whatever the run computed on, and are mapped back on load).
Importing it chooses nothing.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

DEVICE_SPECS = "auto | cpu | cuda | cuda:N"
STORAGE = torch.device("cpu")  # checkpoints and exported tensors are device-free
CPU = STORAGE


class DeviceError(ValueError):
    """A device spec that names no usable device."""


def env_local_rank() -> int:
    """This process's LOCAL_RANK under torchrun (0 outside it)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def resolve_device(spec: str | torch.device | None = "auto",
                   local_rank: int | None = None) -> torch.device:
    """The device this process runs on: `auto` is CUDA when available (else CPU), `cuda` is
    the GPU of this process's LOCAL_RANK, `cuda:N` that GPU, `cpu` the CPU.

    Ranks beyond the visible GPUs share them round-robin (2 processes on 1 GPU run both on
    cuda:0); `process_group_backend` then avoids NCCL, which refuses two ranks on one GPU.
    """
    text = str(spec if spec is not None else "auto").strip().lower() or "auto"
    rank = env_local_rank() if local_rank is None else local_rank
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return CPU
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {spec!r}; use {DEVICE_SPECS}") from exc
    if device.type != "cuda":
        raise DeviceError(f"unsupported device {spec!r}; use {DEVICE_SPECS}")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for but CUDA is not available "
                          "(use --device auto or cpu)")
    count = torch.cuda.device_count()
    index = rank % count if device.index is None else device.index
    if index >= count:
        raise DeviceError(f"device {spec!r}: only {count} CUDA device(s) are visible")
    return _cuda(index)


def _cuda(index: int) -> torch.device:
    return torch.device("cuda", index)


def is_cuda(device: torch.device) -> bool:
    """Whether `device` is a GPU (CUDA kernels, autocast, pinned memory, NCCL)."""
    return torch.device(device).type == "cuda"


def device_name(device: torch.device) -> str:
    """A human name for the device: the card's name on CUDA, `cpu` otherwise."""
    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return torch.device(device).type


def device_params(device: torch.device) -> dict[str, str]:
    """The run params that record where a run computed."""
    return {"device": str(device), "device_name": device_name(device)}


def prepare(device: torch.device) -> None:
    """Make `device` this process's current CUDA device (NCCL and kernels use it)."""
    if is_cuda(device):
        torch.cuda.set_device(device)


def process_group_backend(device: torch.device, world_size: int) -> str:
    """torch.distributed backend for ranks computing on `device`.

    CPU: gloo. CUDA: NCCL for CUDA tensors, with gloo beside it for the small CPU tensors
    the ranks agree on (losses, guard flags). NCCL refuses two ranks on one GPU, so ranks that
    share a GPU (more ranks than visible GPUs) use gloo for CUDA tensors too.
    """
    if not is_cuda(device):
        return "gloo"
    if world_size > torch.cuda.device_count():
        logger.warning("%d ranks share %d GPU(s): NCCL needs one GPU per rank, using gloo",
                       world_size, torch.cuda.device_count())
        return "gloo"
    return "cpu:gloo,cuda:nccl"


# ---- placement -------------------------------------------------------------------------------
def place(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`module` with its parameters and buffers on `device` (in place; returned for chaining)."""
    return module.to(device)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch (a tensor, or a mapping whose tensor values move) on `device`.

    Non-blocking: from pinned memory the copy overlaps the GPU's work; on CPU it is a no-op.
    """
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}
    return batch


def host_values(*tensors: torch.Tensor) -> list[float]:
    """The values of scalar tensors as floats, read in one device-to-host copy.

    Every read of a device value waits for the GPU to catch up (a host sync): a training step
    reads what it must (the losses for the log and the guards, the gradient norm) through
    this one function, in as few calls as it can.
    """
    if not tensors:
        return []
    stacked = torch.stack([t.detach().reshape(()).float() for t in tensors])
    return stacked.to(STORAGE).tolist()


def to_storage(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, detached, on the storage device (CPU) for saving: a copy only off the CPU."""
    return tensor.detach().to(STORAGE)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global random generators a run on `device` draws from (CPU, and its GPU's)."""
    state = {"cpu": torch.get_rng_state()}
    if is_cuda(device):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(device: torch.device, state: dict[str, torch.Tensor]) -> None:
    """Put back generators saved by `rng_state`."""
    torch.set_rng_state(to_storage(state["cpu"]))
    if is_cuda(device) and "cuda" in state:
        torch.cuda.set_rng_state(to_storage(state["cuda"]), device)


def map_location(device: torch.device | str | None) -> str:
    """The `map_location` / safetensors `device` that loads saved tensors onto `device`."""
    return str(torch.device(device) if device is not None else STORAGE)


# ---- precision -------------------------------------------------------------------------------
@functools.cache
def cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 autocast
    roughly halves an LLM forward's time (SmolLM2-135M, 16 x 200 tokens, 2 cores: 6.4-7.0 s
    fp32, 3.1-3.4 s bf16); elsewhere it is emulated and no faster."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast(device: torch.device, enabled: bool = True, cpu: bool = False):
    """bf16 autocast on CUDA (master weights stay fp32). On a CPU fp32, unless `cpu` asks for
    bf16 and the CPU multiplies bf16 natively (`cpu_bf16`)."""
    if enabled and is_cuda(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return cpu_bf16_region(device, enabled and cpu)


def _bf16_on_cpu(device: torch.device, asked: bool) -> bool:
    return asked and device.type == "cpu" and cpu_bf16()


def cpu_bf16_region(device: torch.device, asked: bool):
    """bf16 autocast for a no-grad pass on a CPU that multiplies bf16 natively, when `asked`
    (Stage 2's `cpu_bf16`); fp32 everywhere else, CUDA included (there such passes stay fp32)."""
    if _bf16_on_cpu(device, asked):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_precision(device: torch.device, cpu: bool = False) -> str:
    """What `autocast(device, cpu=cpu)` computes in: 'bf16' or 'fp32' (a run param)."""
    return "bf16" if is_cuda(device) or _bf16_on_cpu(device, cpu) else "fp32"


def full_precision(device: torch.device):
    """A region computed in fp32 even inside an autocast one (health metrics, the grounding
    gap, validation)."""
    if is_cuda(device):
        return torch.autocast("cuda", enabled=False)
    return contextlib.nullcontext()


# ---- data loading ----------------------------------------------------------------------------
def loader_options(device: torch.device, num_workers: int | None) -> dict[str, Any]:
    """DataLoader options that feed `device`: `num_workers` None means auto (0 on CPU, where
    the 2-core machines train in the main process; up to 4 per GPU), pinned memory on CUDA,
    and workers kept between epochs."""
    if num_workers is None:
        num_workers = min(4, os.cpu_count() or 1) if is_cuda(device) else 0
    return {"num_workers": num_workers, "pin_memory": is_cuda(device),
            "persistent_workers": num_workers > 0,
            **({"worker_init_fn": ignore_ctrl_c} if num_workers > 0 else {})}


def ignore_ctrl_c(worker_id: int = 0) -> None:  # noqa: ARG001 - DataLoader's signature
    """A loader worker ignores SIGINT: a terminal's Ctrl-C reaches the whole process group, and
    the training process owns the stop (it finishes the step, saves, ends the run KILLED); a
    worker that died of it would turn that into a failed run. SIGTERM still ends a worker: it
    is how its parent (and multiprocessing at exit) stops it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
