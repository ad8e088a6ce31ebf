"""The GPU check: what only a GPU can show, as one table (`benchmarks/gpu_check.sh` runs it).

Rows: the card; the mixer's kernel path (mamba_ssm selective_scan_fn + causal_conv1d_fn) against
the portable scan on the same weights, parity (output and every gradient; fp32 and bf16
autocast) and fwd+bwd time at L=196 and L=784; Stage 2 steps/s (bf16 autocast, fp32 master
weights) and its ratio to the frozen LLM's own forward+backward on the same sequences; the
demo-profile main run's wall time; DDP with 2 processes against 1 (the same global batches:
their losses must agree).

`--dry-run` runs every section at toy sizes on the CPU (no kernels, no subprocess runs), so the
table code is exercised by the test suite:

    python benchmarks/gpu_check.py [--dry-run] [--device cuda] [--skip-demo] [--skip-ddp]
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: the project is importable from its root
    sys.path.insert(0, str(ROOT))

# Kernel vs portable, max|a - b| / max|b| over output and every gradient (tests/test_mamba.py).
TOLERANCE = {"fp32": 2e-3, "bf16": 5e-2}
DDP_RTOL = 2e-2  # bf16 autocast: a batch of 2 and two batches of 1 round differently


@dataclass
class Row:
    """One line of the table."""

    check: str
    result: str
    status: str = "ok"  # ok | FAIL | n/a


def format_table(rows: list[Row]) -> str:
    """The rows as one aligned plain-text table."""
    header = Row("check", "result", "status")
    widths = [max(len(getattr(r, f)) for r in [header, *rows]) for f in ("check", "result")]
    lines = [f"{r.check:<{widths[0]}}  {r.result:<{widths[1]}}  {r.status}"
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# ---- the mixer --------------------------------------------------------------------------------
def mixer_rows(device: torch.device, lengths, d_model: int = 192, repeats: int = 10) -> list[Row]:
    """Kernel path vs portable scan: parity (fp32, bf16 autocast) and fwd+bwd time per L."""
    from pipeline.device import autocast
    from pipeline.models import mamba as M

    kernels = M._load_kernels() if device.type == "cuda" else None
    precision = "bf16" if device.type == "cuda" else "fp32"  # what autocast gives here
    rows = []
    for L in lengths:
        torch.manual_seed(0)
        mixer = M.Mamba(d_model, d_state=16, d_conv=4, expand=2).to(device)  # fp32 master weights
        x = torch.randn(2, L, d_model, device=device)
        grad = torch.randn_like(x)

        def run(fast: bool, bf16: bool):
            mixer.use_fast_path = fast
            mixer.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            with autocast(device, enabled=bf16):
                y = mixer(xi)
            y.float().backward(grad)
            return [y, xi.grad] + [p.grad for p in mixer.parameters()]

        portable_ms = _median_ms(lambda: run(False, True), device, repeats)
        if kernels is None:
            why = "no CUDA" if device.type != "cuda" else "mamba_ssm not installed"
            rows.append(Row(f"mixer L={L} fwd+bwd ({precision})",
                            f"portable {portable_ms:.2f} ms; kernel n/a ({why})", "n/a"))
            continue
        kernel_ms = _median_ms(lambda: run(True, True), device, repeats)
        rows.append(Row(f"mixer L={L} fwd+bwd ({precision})",
                        f"kernel {kernel_ms:.2f} ms, portable {portable_ms:.2f} ms "
                        f"({portable_ms / kernel_ms:.1f}x)"))
        errors = {}
        for name, bf16 in (("fp32", False), ("bf16", True)):
            kernel, portable = run(True, bf16), run(False, bf16)
            errors[name] = max(_rel_err(a, b) for a, b in zip(kernel, portable))
        ok = all(errors[k] < TOLERANCE[k] for k in errors)
        rows.append(Row(f"mixer L={L} parity kernel vs portable",
                        ", ".join(f"{k} {v:.1e} (tol {TOLERANCE[k]:g})" for k, v in errors.items()),
                        "ok" if ok else "FAIL"))
    return rows


# ---- Stage 2 ----------------------------------------------------------------------------------
def stage2_rows(device: torch.device, profile: str, llm_name: str | None, steps: int,
                data_root: str) -> list[Row]:
    """Stage 2 steps/s (the trainer's own step: bf16 autocast on CUDA, optimizer included) and
    the ratio of its time to the frozen LLM's forward+backward on the same sequences."""
    from pipeline import config as C
    from pipeline.data import load_dataset
    from pipeline.device import autocast, place, to_device
    from pipeline.models import captioning
    from pipeline.models.llm_loading import load_llm
    from pipeline.models.vision_bridge import VisionBridge
    from pipeline.stage2.trainer import Stage2Trainer
    from pipeline.train.common import EpochLoaders
    from pipeline.train.distributed import World

    world = World(device=device)
    overrides = {"data.root": data_root, **({"llm.name": llm_name} if llm_name else {})}
    cfg = C.build(C.Stage2Config, profile, overrides)
    llm = place(load_llm(cfg.llm.name, cfg.llm.cache_dir, cfg.llm.dtype), device)
    model = place(VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=llm.hidden_size),
                  device)
    records = load_dataset(cfg.data)
    loaders = EpochLoaders(records["train"], records["val"], cfg.encoder.image_size,
                           cfg.batch_size, cfg.seed, world, cfg.data.num_workers)
    out = tempfile.mkdtemp(prefix="gpu_check_stage2_")
    trainer = Stage2Trainer(cfg, model, llm, loaders, out, "gpu-check", lambda m, s: None,
                            lambda t: None, logging.getLogger("gpu_check"), world=world)
    trainer._t0 = time.monotonic()
    warmup = 2
    batches = list(islice(cycle(list(loaders.epoch(1))), warmup + steps))
    for batch in batches[:warmup]:
        trainer._step(batch, 1)
    _sync(device)
    syncs = sync_row(device, trainer, batches[warmup:warmup + 3])
    start = time.perf_counter()
    for batch in batches[warmup:]:
        trainer._step(batch, 1)
    _sync(device)
    step_ms = (time.perf_counter() - start) * 1e3 / steps

    # The LLM alone: the same kind of sequence ([visual][prompt][report]) with gradients
    # flowing back to the input embeddings, as in Stage 2, under the same autocast.
    batch = batches[0]
    with torch.no_grad():
        visual = model(to_device(batch["images"], device))
    layout = captioning.tokenize_batch(llm.tokenizer, cfg.prompt, list(batch["reports"]),
                                       llm.eos_token_id, llm.pad_token_id, visual.shape[1],
                                       cfg.max_report_tokens)
    labels = captioning.make_labels(layout).to(device)
    embeds, mask = captioning.assemble(visual, layout, llm.embed)
    embeds = embeds.detach().requires_grad_()

    def llm_step():
        with autocast(device):
            loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        loss.backward()

    llm_ms = _median_ms(llm_step, device, repeats=max(3, steps))
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    return [syncs,
            Row(f"stage2 step ({profile}, {cfg.llm.name}, bs {cfg.batch_size}, {precision})",
                f"{1e3 / step_ms:.2f} steps/s ({step_ms:.1f} ms/step)"),
            Row("stage2 step / frozen LLM fwd+bwd",
                f"{step_ms / llm_ms:.2f}x (LLM alone {llm_ms:.1f} ms, seq {embeds.shape[1]})")]


MAX_SYNCS_PER_STEP = 3  # the losses for the log, the fused gradient norm, the stop flag


def sync_row(device: torch.device, trainer, batches) -> Row:
    """Host syncs per Stage 2 step: on a GPU as CUDA reports them
    (`torch.cuda.set_sync_debug_mode("warn")`: one warning per synchronising call); on the
    CPU the count `benchmarks/bench_syncs.py` takes on a fake CUDA device."""
    if device.type != "cuda":
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_syncs import count_steps
        from tests.fake_cuda import stage2_trainer

        counts, _, error = count_steps(lambda work: stage2_trainer(work, findings_weight=3.0),
                                       len(batches))
        how = "fake CUDA, tiny"
    else:
        import warnings

        counts, error, how = [], None, "set_sync_debug_mode"
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    trainer._step(batch, 1)
                counts.append(sum("synchroniz" in str(w.message) for w in caught))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    ok = error is None and counts and max(counts) <= MAX_SYNCS_PER_STEP
    return Row(f"host syncs per stage2 step ({how})",
               f"{' '.join(map(str, counts)) or '-'} (bound {MAX_SYNCS_PER_STEP})"
               + (f"; {error}"[:120] if error else ""), "ok" if ok else "FAIL")


# ---- whole runs (subprocesses) ----------------------------------------------------------------
def _env(store: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return env | {"PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store,
                  "REPORT_VLM_PROJECT_DIR": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}


def demo_row(device_spec: str, timeout: int) -> Row:
    """Wall time of the demo profile's main run (what `make demo` runs) on the device."""
    work = Path(tempfile.mkdtemp(prefix="gpu_check_demo_"))
    cmd = [sys.executable, "-m", "steps.main", "--profile", "demo", "--device", device_spec]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=work, env=_env(f"sqlite:///{work / 'mlflow.db'}"),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Row("demo profile main run", f"still running after {timeout} s (stopped)", "FAIL")
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return Row("demo profile main run", f"exit {done.returncode}: {tail[0][:100]}", "FAIL")
    return Row("demo profile main run", f"{seconds:.0f} s wall ({seconds / 60:.1f} min)")


def _stage2_losses(work: Path, device_spec: str, nproc: int, batch_size: int,
                   timeout: int) -> tuple[list[float], str]:
    out = work / f"nproc{nproc}"
    cmd = [sys.executable, "-m", "steps.stage2", "--profile", "tiny", "--init", "scratch",
           "--device", device_spec, "--batch_size", str(batch_size), "--nproc", str(nproc),
           "--output_dir", str(out)]
    done = subprocess.run(cmd, cwd=work, env=_env(f"sqlite:///{work / 'mlflow.db'}"),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1][:160])
    (log,) = out.glob("*/stage2_train_log.csv")
    with open(log, newline="", encoding="utf-8") as handle:
        losses = [float(r["caption_loss"]) for r in csv.DictReader(handle)]
    from pipeline.device import process_group_backend

    return losses, process_group_backend(torch.device(device_spec), nproc)


def ddp_row(device_spec: str, timeout: int) -> Row:
    """Stage 2 (tiny) on 2 processes at batch 1 against 1 process at batch 2: the same global
    batches, so the same losses up to rounding."""
    work = Path(tempfile.mkdtemp(prefix="gpu_check_ddp_"))
    try:
        single, _ = _stage2_losses(work, device_spec, 1, 2, timeout)
        ddp, backend = _stage2_losses(work, device_spec, 2, 1, timeout)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        return Row("DDP 2 processes vs 1 (stage2 tiny)", f"failed: {exc}"[:160], "FAIL")
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ddp, single))
    ok = len(ddp) == len(single) and worst < DDP_RTOL
    return Row(f"DDP 2 processes vs 1 (stage2 tiny, {backend})",
               f"{len(ddp)} steps, max rel loss diff {worst:.1e} (tol {DDP_RTOL:g})",
               "ok" if ok else "FAIL")


# ---- the check --------------------------------------------------------------------------------
def card_row(device: torch.device) -> Row:
    """The card the check ran on."""
    from pipeline.device import device_name

    if device.type != "cuda":
        return Row("device", f"{device_name(device)} (no CUDA: dry run)", "n/a")
    props = torch.cuda.get_device_properties(device)
    return Row("device", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch "
                         f"{torch.__version__}, CUDA {torch.version.cuda}")


def run_check(device: torch.device, dry_run: bool, demo: bool = True, ddp: bool = True,
              demo_timeout: int = 200, ddp_timeout: int = 120) -> list[Row]:
    """Every row of the check (toy sizes, no subprocesses when `dry_run`)."""
    rows = [card_row(device)]
    lengths = (16,) if dry_run else (196, 784)
    rows += mixer_rows(device, lengths, d_model=32 if dry_run else 192,
                       repeats=2 if dry_run else 10)
    with tempfile.TemporaryDirectory(prefix="gpu_check_data_") as data_root:
        if dry_run:
            rows += stage2_rows(device, "tiny", "tiny-random", steps=2, data_root=data_root)
        else:
            rows += stage2_rows(device, "demo", None, steps=20, data_root=data_root)
    spec = str(device)
    rows.append(demo_row(spec, demo_timeout) if demo and not dry_run
                else Row("demo profile main run", "skipped", "n/a"))
    rows.append(ddp_row(spec, ddp_timeout) if ddp and not dry_run
                else Row("DDP 2 processes vs 1", "skipped", "n/a"))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="toy sizes on the CPU, no subprocess runs (exercises the table)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--demo-timeout", type=int, default=200)
    args = parser.parse_args(argv)
    from pipeline.device import resolve_device

    device = torch.device("cpu") if args.dry_run else resolve_device(args.device)
    rows = run_check(device, args.dry_run, demo=not args.skip_demo, ddp=not args.skip_ddp,
                     demo_timeout=args.demo_timeout)
    print(format_table(rows), flush=True)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
