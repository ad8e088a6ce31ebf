"""A fake CUDA device on a machine without one: `fake_cuda()` runs code with the device
decision forced to cuda:0 under PyTorch's `FakeTensorMode`.

What lands on the GPU is a fake tensor (shapes, dtypes and devices, no data): an op that mixes
cuda:0 and a CPU tensor raises `FakeTensorDeviceMismatchError`, as it would on a card. The
CPU side stays real (`_RealCpu`): tensors built from Python data, the data loader's batches and
the CPU random generators compute as they do in a CPU run, so the control flow a step takes
on the host is the one it takes there.

Every read of a device value is a host sync on a GPU. Here such reads have no value to read:
the mode counts them (`Syncs`) and answers with a stand-in (1.0, 1, False), so that a step runs
to its end and the count is exact. A sync is `aten._local_scalar_dense` on a CUDA tensor
(`.item()`, `float(t)`, `bool(t)`, `.tolist()` per element) or a device-to-host copy
(`.cpu()`, `.to("cpu")`, `.tolist()` after it); reads of the host copy are free.

Two gaps of a CPU-only torch build are bridged (a CUDA build of torch needs neither):
- its autograd has no CUDA device guard, so a fake CUDA tensor that requires grad aborts the
  process; `install_cuda_guard` registers the no-op guard a CUDA build without a device gets
  (`torch._C._ensureCUDADeviceGuardSet`);
- its autograd engine has no CUDA streams, so `backward` cannot run; `_shape_backward` stands
  in: every parameter the loss depends on (the AccumulateGrad leaves of its graph) gets a
  gradient of its own device, dtype and shape, which is what the engine produces.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import traceback
import weakref
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GPU = torch.device("cuda", 0)
CUDA_BUILD = torch.backends.cuda.is_built()
_DEVICE_TYPE_CUDA, _DEVICE_TYPE_PRIVATEUSE1 = 1, 20  # c10::DeviceType
_GUARD = []  # the registered guard object, kept alive


def install_cuda_guard() -> None:
    """Give a CPU-only torch build the no-op CUDA device guard (once per process)."""
    if CUDA_BUILD or _GUARD:
        return
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    registry = ctypes.addressof(ctypes.c_void_p.in_dll(
        lib, "_ZN3c104impl26device_guard_impl_registryE"))
    register = lib._ZN3c104impl19registerDeviceGuardENS_10DeviceTypeEPKNS0_24DeviceGuardImplInterfaceE
    register.argtypes, register.restype = [ctypes.c_int8, ctypes.c_void_p], None

    class CudaGuard(torch._C._acc.DeviceGuard):
        def type_(self):
            return torch._C._autograd.DeviceType.CUDA

    guard = CudaGuard()
    # torch registers a Python guard only for PrivateUse1: register it there, move it to CUDA
    if ctypes.c_void_p.from_address(registry + 8 * _DEVICE_TYPE_PRIVATEUSE1).value:
        raise RuntimeError("a PrivateUse1 device guard is already registered")
    if not torch._C._acc.register_python_privateuseone_device_guard(guard):
        raise RuntimeError("could not register the fake CUDA device guard")
    pointer = ctypes.c_void_p.from_address(registry + 8 * _DEVICE_TYPE_PRIVATEUSE1).value
    register(_DEVICE_TYPE_CUDA, pointer)
    register(_DEVICE_TYPE_PRIVATEUSE1, None)
    _GUARD.append(guard)


@dataclass
class Sync:
    """One host sync: what it was and the innermost project frames that asked for it."""

    kind: str  # "read" (_local_scalar_dense) or "copy" (device to host)
    where: tuple[str, ...]

    def through(self, function: str) -> bool:
        return any(f.endswith(f" {function}") for f in self.where)


@dataclass
class Syncs:
    """The host syncs counted so far (`mark` / `since` count those of one step)."""

    events: list[Sync] = field(default_factory=list)

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int) -> list[Sync]:
        return self.events[mark:]

    def record(self, kind: str) -> None:
        stack = traceback.StackSummary.extract(traceback.walk_stack(None), lookup_lines=False)
        frames = [f"{os.path.relpath(s.filename, _ROOT)}:{s.lineno} {s.name}"
                  for s in reversed(stack)
                  if s.filename.startswith(_ROOT) and "/tests/" not in s.filename
                  and "/.venv/" not in s.filename]
        self.events.append(Sync(kind, tuple(frames[-6:])))


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stand_in(tensor: torch.Tensor):
    """The value a read of a fake tensor answers: 1.0, 1, and False (no guard fires) except in
    transformers' generation loop, where True ('every sequence finished') ends generation
    after its first token instead of never."""
    if tensor.dtype == torch.bool:
        return any("/transformers/generation/" in frame.f_code.co_filename
                   for frame, _ in itertools.islice(traceback.walk_stack(None), 12))
    return 1.0 if tensor.is_floating_point() or tensor.is_complex() else 1


class _RealCpu(TorchDispatchMode):
    """Above FakeTensorMode: ops on real CPU tensors alone run for real (outside fake mode);
    reads of fake values are counted (CUDA) and answered with a stand-in."""

    def __init__(self, syncs: Syncs):
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        fake = [t for t in tensors if isinstance(t, FakeTensor)]
        if func is torch.ops.aten._local_scalar_dense.default and fake:
            if fake[0].fake_device.type == "cuda":
                self.syncs.record("read")
            return _stand_in(fake[0])
        to_host = any(t.fake_device.type == "cuda" for t in fake) and (
            (func is torch.ops.aten._to_copy.default
             and torch.device(kwargs.get("device") or "cuda").type == "cpu")
            or (func is torch.ops.aten.copy_.default and args[0].device.type == "cpu"))
        if to_host:
            self.syncs.record("copy")
        # A blocking copy to the GPU (`.to("cuda")` without non_blocking) from the host's
        # pageable memory synchronises the stream first (`memcpy_and_sync`): it stalls the host
        # until the GPU has finished its queue, as a read does.
        elif (func is torch.ops.aten._to_copy.default and tensors and not fake
              and torch.device(kwargs.get("device") or "cpu").type == "cuda"
              and not kwargs.get("non_blocking")):
            self.syncs.record("upload")
        devices = [torch.device(d) for d in flat if isinstance(d, (torch.device, str))
                   and _is_device(d)]
        if not fake and all(d.type == "cpu" for d in devices):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _is_device(value) -> bool:
    if isinstance(value, torch.device):
        return True
    try:
        torch.device(value)
        return value.split(":")[0] in ("cpu", "cuda", "meta")
    except (RuntimeError, AttributeError):
        return False


def _leaves(root) -> list[torch.Tensor]:
    """The tensors (parameters) whose gradients a backward from `root` accumulates."""
    seen, stack, leaves = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _shape_backward(tensor: torch.Tensor, gradient=None, retain_graph=None,
                    create_graph=False, inputs=None) -> None:
    """`Tensor.backward` where the autograd engine cannot run CUDA: each leaf the loss depends
    on accumulates a gradient of its own device, dtype and shape."""
    if tensor.grad_fn is None:
        raise RuntimeError("element 0 of tensors does not require grad and does not have a "
                           "grad_fn")
    with torch.no_grad():
        for leaf in _leaves(tensor.grad_fn):
            grad = torch.empty_like(leaf)
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad


def _swap_tensors(swap):
    """`torch.utils.swap_tensors` that, for a FakeTensor parameter FakeTensorMode holds a weak
    reference to (a module moved to the device it is on, or cast), takes the new tensor's data
    instead: `Module._apply` always swaps fake parameters, and a weakly referenced tensor
    cannot be swapped."""
    def swap_tensors(t1, t2):
        if isinstance(t1, FakeTensor) and (weakref.getweakrefs(t1) or weakref.getweakrefs(t2)):
            t1.data = t2.data
            return
        swap(t1, t2)
    return swap_tensors


def _numpy(numpy):
    """`Tensor.numpy` that gives a fake (host) tensor's bytes as zeros: a stand-in, as reads
    of its values are."""
    def to_numpy(tensor, *args, **kwargs):
        if isinstance(tensor, FakeTensor):
            with unset_fake_temporarily():
                return numpy(torch.zeros(tensor.shape, dtype=tensor.dtype), *args, **kwargs)
        return numpy(tensor, *args, **kwargs)
    return to_numpy


@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """Run the block with `--device auto` resolving to cuda:0 and every CUDA tensor fake;
    yields the `Syncs` counted."""
    install_cuda_guard()
    from pipeline import device as D

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device=None: torch.zeros(16, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: None)
    monkeypatch.setattr(torch.Tensor, "numpy", _numpy(torch.Tensor.numpy))
    monkeypatch.setattr(torch.utils, "swap_tensors", _swap_tensors(torch.utils.swap_tensors))
    if not CUDA_BUILD:
        monkeypatch.setattr(torch.Tensor, "backward", _shape_backward)
    monkeypatch.setattr(FakeTensorMode, "avoid_device_init", property(lambda self: True))
    assert D.resolve_device("auto") == GPU
    syncs = Syncs()
    with FakeTensorMode(allow_non_fake_inputs=True), _RealCpu(syncs):
        yield syncs


# ---- the tiny profile's trainers on the fake device (tests/test_fake_cuda.py, bench_syncs) --

def stage1_trainer(work, objective: str = "findings"):
    """A tiny-profile Stage 1 trainer on the device `join_world` resolves (inside `fake_cuda`:
    cuda:0), its data generated under `work`."""
    import logging

    from pipeline import config as C
    from pipeline.stage1.trainer import Stage1Trainer, build_stage1_inputs
    from pipeline.train.distributed import join_world

    world = join_world("auto")
    cfg = C.build(C.Stage1Config, "tiny", {"data.root": str(work / "data"),
                                           "objective": objective})
    inputs = build_stage1_inputs(cfg, world)
    return Stage1Trainer(cfg, inputs.model, inputs.loaders, inputs.probe_images,
                         work / f"stage1_{objective}", "fake", lambda m, s: None,
                         lambda t: None, logging.getLogger("fake_cuda"), world=world)


def stage2_trainer(work, **overrides):
    """A tiny-profile Stage 2 trainer (adapters, findings weighted) with a tiny random LM,
    built as `Stage2Job` builds it; `overrides` change its config."""
    import logging

    from pipeline import config as C
    from pipeline.data import load_dataset
    from pipeline.models.tiny_lm import build_tiny_llm
    from pipeline.stage2.job import Stage2Job
    from pipeline.stage2.trainer import Stage2Trainer
    from pipeline.train.common import EpochLoaders
    from pipeline.train.distributed import join_world

    world = join_world("auto")
    cfg = C.build(C.Stage2Config, "tiny", {"data.root": str(work / "data"), **overrides})
    job = Stage2Job(cfg, profile="tiny", init="scratch", llm=build_tiny_llm(), world=world,
                    echo=lambda m: None)
    _, llm, model, _ = job._build(None)
    records = load_dataset(cfg.data)
    loaders = EpochLoaders(records["train"], records["val"], cfg.encoder.image_size,
                           cfg.batch_size, cfg.seed, world)
    return Stage2Trainer(cfg, model, llm, loaders, work / "stage2", "fake", lambda m, s: None,
                         lambda t: None, logging.getLogger("fake_cuda"), world=world)
