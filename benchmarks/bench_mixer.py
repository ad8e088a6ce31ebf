"""Mamba mixer forward+backward on the CPU: our portable scan vs transformers' PyTorch paths.

    python benchmarks/bench_mixer.py [--full] [--reps 12]

Batch 2, d_model 192 (d_inner 384, d_state 16, d_conv 4), fp32, torch.set_num_threads(2),
L = 196 (224 px / patch 16) and 784 (patch 8). All mixers carry the same weights:
  (a) pipeline.models.mamba.Mamba, portable path (chunked scan, hand-written backward)
  (b) transformers MambaMixer, use_mambapy=False: its slow_forward sequential loop
  (c) transformers MambaMixer, use_mambapy=True: mambapy's parallel scan
  (d) (a) with the scan replaced by u * dt * sum(B * C): the floor, everything but the scan
(b) at L=784 takes ~35 s per repetition and only runs with --full.
Times are wall-clock medians of fwd+bwd (output.backward(fixed random grad)) after 2 warm-ups,
the fast mixers' repetitions interleaved round-robin so that load from other processes on a
shared machine falls on all of them alike.
"peak RSS +MB" is measured in a fresh subprocess per mixer: VmHWM - VmRSS around its first
full-size forward+backward (after a tiny warm-up, HWM reset through /proc/self/clear_refs), i.e.
the transient host memory that one step needs, allocator behaviour included.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipeline.models.mamba import Mamba  # noqa: E402
from pipeline.models.vision import VisionMamba  # noqa: E402

D_MODEL, BATCH, THREADS = 192, 2, 2
NAMES = {"a": "(a) ours, portable chunked scan", "b": "(b) HF MambaMixer slow path",
         "c": "(c) HF MambaMixer + mambapy", "d": "(d) ours, scan removed (floor)"}


class FloorMamba(Mamba):
    """The mixer with the selective scan replaced by a cheap op of the same shapes (the floor)."""

    def ssm(self, u, dt, A, B, C):
        return u * dt * (B * C).sum(-1, keepdim=True)


def build(kind: str) -> torch.nn.Module:
    """Mixer `kind` carrying the weights of Mamba(192) seeded with 0."""
    torch.manual_seed(0)
    ours = Mamba(D_MODEL, d_state=16, d_conv=4, expand=2)
    if kind == "a":
        return ours
    if kind == "d":
        floor = FloorMamba(D_MODEL, d_state=16, d_conv=4, expand=2)
        floor.load_state_dict(ours.state_dict())
        return floor
    import transformers
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    transformers.logging.set_verbosity_error()  # "falling back to PyTorch" is the point here
    config = MambaConfig(hidden_size=D_MODEL, state_size=16, conv_kernel=4, expand=2,
                         use_mambapy=(kind == "c"))
    mixer = MambaMixer(config, layer_idx=0)
    mixer.load_state_dict(ours.state_dict())  # same names: in_proj, conv1d, x_proj, dt_proj, ...
    return mixer


def inputs(L: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(L)
    x = torch.randn(BATCH, L, D_MODEL, generator=gen)
    return x, torch.randn(BATCH, L, D_MODEL, generator=gen)


def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """One forward+backward; returns [output, input grad, parameter grads...]."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return [y.detach(), x.grad] + [p.grad for _, p in sorted(module.named_parameters())]


def time_it(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Round-robin repetitions, so that load from other processes hits every mixer alike."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name] += time_it(fn, 1, warmup=0)
    return times


def rel_err(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """Worst max|got - ref| / max|ref| over output and all gradients."""
    return max(float((g - r).abs().max() / r.abs().max().clamp(min=1e-30))
               for g, r in zip(got, ref) if r is not None)


def peak_rss_mb(kind: str, L: int) -> float:
    """Peak resident-memory increase of one fwd+bwd of `kind`, measured in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--_memory", kind, str(L)], check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(kind: str, L: int) -> None:
    torch.set_num_threads(THREADS)
    module = build(kind)
    step(module, *inputs(8))  # libraries and lazy inits loaded outside the measurement
    x, grad = inputs(L)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _proc_status_kb("VmRSS")
    step(module, x, grad)
    print((_proc_status_kb("VmHWM") - before) / 1024)


def encoder_images_per_s(reps: int) -> float:
    """Default-size VisionMamba (224 px, patch 16, d 192, depth 4), batch 2, fwd+bwd images/s."""
    torch.manual_seed(0)
    encoder = VisionMamba(224, 16, 1, 192, 4, d_state=16, d_conv=4, expand=2, chunk_size=32)
    images = torch.randn(2, 1, 224, 224)

    def run():
        encoder.zero_grad(set_to_none=True)
        encoder(images).square().mean().backward()

    return 2 / statistics.median(time_it(run, reps, warmup=1))


def bench_length(L: int, kinds: list[str], reps: int) -> dict[str, dict]:
    """Times, agreement with (a) and peak memory of each mixer at sequence length L."""
    x, grad = inputs(L)
    modules = {kind: build(kind) for kind in kinds}
    results = {kind: step(module, x, grad) for kind, module in modules.items()}  # warm-up 1
    fast = {k: functools.partial(step, m, x, grad) for k, m in modules.items() if k != "b"}
    for fn in fast.values():  # warm-up 2
        fn()
    times = time_interleaved(fast, reps)
    if "b" in modules:  # ~0.5 s (L=196) or ~35 s (L=784) a repetition
        times["b"] = time_it(functools.partial(step, modules["b"], x, grad),
                             5 if L < 200 else 2, warmup=0)
    rows = {}
    for kind in kinds:
        err = None if kind in ("a", "d") else rel_err(results[kind], results["a"])
        rows[kind] = {"times": times[kind], "err": err, "rss": peak_rss_mb(kind, L)}
        ms = [t * 1e3 for t in times[kind]]
        print(f"  L={L:4d} {NAMES[kind]:34s} median {statistics.median(ms):9.1f} ms  "
              f"min {min(ms):9.1f}  max {max(ms):9.1f}  n={len(ms):2d}  "
              f"peak RSS +{rows[kind]['rss']:6.0f} MB", flush=True)
    return rows


def verdict(name: str, value: float, op: str, target: float) -> None:
    ok = value >= target if op == ">=" else value <= target
    print(f"  {'PASS' if ok else 'FAIL'}  {name}: {value:.2f}x (target {op} {target}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="also run (b) at L=784 (~2 min)")
    parser.add_argument("--reps", type=int, default=12, help="timed repetitions of fast mixers")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        return _memory_child(args._memory[0], int(args._memory[1]))
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f} (other processes share these cores)")
    started = time.perf_counter()
    results = {L: bench_length(L, ["a", "b", "c", "d"] if L < 200 or args.full else ["a", "c", "d"],
                               args.reps) for L in (196, 784)}
    print("\nagreement with (a), max relative error over output and all gradients:")
    for L, rows in results.items():
        errs = [f"{k}: {r['err']:.1e}" for k, r in rows.items() if r["err"] is not None]
        print(f"  L={L}: " + ", ".join(errs))
    med = {L: {k: statistics.median(r["times"]) for k, r in rows.items()}
           for L, rows in results.items()}
    print("\nspeed-ups of (a) (median ratios):")
    for L, m in med.items():
        parts = [f"b/a {m['b'] / m['a']:.1f}x" if "b" in m else None, f"c/a {m['c'] / m['a']:.1f}x",
                 f"a/d {m['a'] / m['d']:.2f}x (scan cost {1e3 * (m['a'] - m['d']):.1f} ms)"]
        print(f"  L={L}: " + ", ".join(p for p in parts if p))
    print(f"\nVisionMamba default (224 px, patch 16, d 192, depth 4), batch 2, fwd+bwd: "
          f"{encoder_images_per_s(5):.1f} images/s")
    print("\ntargets:")
    verdict("L=196 (a) vs (b), b/a", med[196]["b"] / med[196]["a"], ">=", 12)
    verdict("L=196 (a) vs (c), c/a", med[196]["c"] / med[196]["a"], ">=", 2)
    verdict("L=196 (a) vs floor (d), a/d", med[196]["a"] / med[196]["d"], "<=", 1.6)
    verdict("L=784 (a) vs (c), c/a", med[784]["c"] / med[784]["a"], ">=", 4)
    print(f"\ntotal {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
