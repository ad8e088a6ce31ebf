"""Where Stage 2's vision + bridge weights come from, decided in a fixed order.

1. `scratch` (or `--from_scratch`): fresh weights.
2. an explicit path, `runs:/` or `models:/` URI: that checkpoint, refused when its Stage 1
   run was rejected by the gate or its features are collapsed (unless forced).
3. `latest` (asked for, never implied): the newest `vision_bridge_vlm_final` of an earlier
   FINISHED Stage 2 run trained with the same encoder, bridge and LLM (output folder, then
   experiment); else as `auto`.
4. `auto`: `models:/vision-bridge@stage2-ready`; else fresh. Each run starts from the same
   gate-approved Stage 1, so runs of a sweep differ only in what the sweep varies.
(`auto` and `latest` first continue an interrupted run of the same config: `Stage2Job`.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline import config as C
from pipeline.checkpoint import STAGE2_FINAL, final_checkpoint_path, read_metadata
from pipeline.guards import GuardError
from pipeline.models.loading import stage1_config_of, with_grid_of
from pipeline.train.health import health_failures, probe_health


@dataclass(frozen=True)
class InitChoice:
    """The chosen initialisation: `source` is what `init.source` is tagged with."""

    source: str  # scratch | checkpoint | previous-stage2 | registry
    path: Path | None = None
    uri: str | None = None
    note: str = ""


def _fits(metadata: dict, cfg: C.Stage2Config | None) -> str:
    """'' when a Stage 2 checkpoint was trained with `cfg`'s encoder, bridge and LLM, else why not."""
    if cfg is None:
        return ""
    saved = metadata.get("config")
    if not isinstance(saved, dict):
        return "it records no config"
    wanted = C.to_dict(cfg)
    differ = [key for key in ("encoder", "bridge") if saved.get(key) != wanted[key]]
    if (saved.get("llm") or {}).get("name") != cfg.llm.name:
        differ.append("llm")
    if adapters_differ(saved, cfg.llm):
        differ.append("adapters")
    return f"its {', '.join(differ)} differ from this run's" if differ else ""


ADAPTER_FIELDS = ("adapter_rank", "adapter_alpha", "adapter_targets")


def adapters_differ(saved_config: dict, llm_cfg: C.LLMConfig) -> str:
    """'' when a Stage 2 checkpoint's config asks for the LLM adapters `llm_cfg` asks for
    (rank, alpha, target modules), else what differs ("rank 2 vs 4")."""
    saved = C.from_dict(C.LLMConfig, saved_config.get("llm") or {})
    return ", ".join(f"{field.removeprefix('adapter_')} {getattr(saved, field)} vs "
                     f"{getattr(llm_cfg, field)}" for field in ADAPTER_FIELDS
                     if tuple_or_value(getattr(saved, field)) !=
                     tuple_or_value(getattr(llm_cfg, field)))


def tuple_or_value(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def initial_adapters(choice: InitChoice, raw_tensors: dict[str, torch.Tensor], metadata: dict,
                     cfg: C.Stage2Config) -> dict[str, torch.Tensor] | None:
    """The LLM adapters an initial Stage 2 checkpoint holds (`raw_tensors`: all its tensors),
    to continue them (None: it holds none, e.g. a Stage 1 checkpoint). Raises GuardError when
    they are not the adapters this run asks for: continuing the vision side alone would train
    it against fresh adapters."""
    from pipeline.checkpoint import split_prefix
    from pipeline.models.llm import ADAPTER_PREFIX

    adapters = split_prefix(raw_tensors, ADAPTER_PREFIX)
    if not adapters:
        return None
    saved = metadata.get("config")
    saved = json.loads(saved) if isinstance(saved, str) else saved
    differ = adapters_differ(saved if isinstance(saved, dict) else {}, cfg.llm)
    if cfg.llm.adapter_rank <= 0 or differ:
        raise GuardError(
            f"refusing to initialise Stage 2 from {choice.uri}: it holds LLM adapters "
            f"({differ or 'this run asks for none'}) that this run cannot continue; ask for "
            "the same adapters (--adapter_rank), or --init scratch")
    return adapters


def _previous_stage2(output_dir: str, cfg: C.Stage2Config | None) -> tuple[Path | None, list]:
    """The newest final checkpoint of a FINISHED earlier Stage 2 run that fits `cfg`.

    A FAILED run may have saved `final` before a check failed (the LLM checksum), and a run of
    another profile or LLM holds weights of other shapes: neither is taken. Returns the path
    (or None) and the reasons candidates were passed over.
    """
    from pipeline.tracking import registry
    from pipeline.tracking.runs import get_run

    local = sorted(Path(output_dir).glob(f"*/{final_checkpoint_path(STAGE2_FINAL)}"),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    candidates = [(p, p.parents[1].name) for p in local]
    stored = registry.latest_stage2_final()
    if stored is not None:
        candidates.append((Path(stored), None))
    skipped = []
    for path, run_id in candidates:
        try:
            metadata = read_metadata(path)
            status = get_run(run_id or metadata.get("run_id")).info.status
        except Exception as exc:  # noqa: BLE001 - an unreadable or unknown candidate is skipped
            skipped.append(f"{path}: {type(exc).__name__}")
            continue
        why = "" if status == "FINISHED" else f"its run is {status}"
        why = why or _fits(metadata, cfg)
        if not why:
            return path, skipped
        skipped.append(f"run {metadata.get('run_id')}: {why}")
    return None, skipped


def choose_init(init: str, output_dir: str, cfg: C.Stage2Config | None = None) -> InitChoice:
    """Resolve `init` (scratch / auto / latest / path / URI) to a concrete choice.

    `latest` takes only weights that fit `cfg` (encoder, bridge, LLM) and names their run.
    """
    from pipeline.tracking import registry

    if init == "scratch":
        return InitChoice("scratch", note="fresh weights (init=scratch)")
    if init not in ("auto", "latest"):
        return InitChoice("checkpoint", registry.download_checkpoint(init), init,
                          note=f"explicit checkpoint {init}")
    previous, skipped = _previous_stage2(output_dir, cfg) if init == "latest" else (None, [])
    passed_over = f" (passed over: {'; '.join(skipped)})" if skipped else ""
    if previous is not None:
        run_id = read_metadata(previous).get("run_id")
        return InitChoice("previous-stage2", Path(previous), str(previous),
                          note=f"continuing from the final weights of the earlier Stage 2 run "
                               f"{run_id} ({previous}){passed_over}")
    uri = f"models:/{registry.VISION_MODEL}@{registry.VISION_ALIAS}"
    try:
        path = registry.download_checkpoint(uri)
    except FileNotFoundError:
        earlier = "no fitting earlier Stage 2 run and " if init == "latest" else ""
        return InitChoice("scratch", note=f"fresh weights: {earlier}no {uri}{passed_over}")
    return InitChoice("registry", path, uri, note=f"gate-approved Stage 1 weights {uri} "
                                                  f"(run {read_metadata(path).get('run_id')})"
                                                  f"{passed_over}")


def adopt_architecture(cfg: C.Stage2Config, metadata: dict, tensors: dict) -> C.Stage2Config:
    """Stage 2 config with the checkpoint's encoder and bridge sizes (weights must fit); the
    finding head's grid is read from the weights (older configs do not name it)."""
    source = stage1_config_of(metadata, None)
    if source is not None:
        cfg = replace(cfg, encoder=source.encoder, bridge=replace(
            source.bridge, max_visual_tokens=cfg.bridge.max_visual_tokens))
    return replace(cfg, bridge=with_grid_of(cfg.bridge, tensors))


def refuse_width_mismatch(choice: InitChoice, width: int | None, llm_name: str,
                          hidden_size: int) -> None:
    """Raise GuardError when the initial weights' visual tokens do not have the LLM's width."""
    if width is not None and width != hidden_size:
        raise GuardError(
            f"refusing to initialise Stage 2 from {choice.uri}: its visual tokens are {width} "
            f"wide but the LLM {llm_name!r} has hidden size {hidden_size}; use the LLM its "
            "Stage 1 was built for (the same profile), or --init scratch")


def refuse_if_unfit(choice: InitChoice, model, metadata: dict, gate_verdict: str | None,
                    probe: torch.Tensor, health_cfg: C.HealthConfig, force: bool) -> dict:
    """Raise GuardError when an explicit checkpoint is rejected or collapsed; return health."""
    health = probe_health(model, probe)
    reasons = []
    if gate_verdict == "rejected":
        reasons.append(f"its Stage 1 run {metadata.get('run_id')} was rejected by the gate")
    failures = health_failures(health, health_cfg)
    if failures:
        reasons.append("its features are collapsed (" + "; ".join(failures) + ")")
    if reasons and not force:
        raise GuardError(f"refusing to initialise Stage 2 from {choice.uri}: "
                         + " and ".join(reasons)
                         + ". Use --init scratch (--from_scratch), or --force_init to override")
    return health
