"""The promotion gate's rules, as a pure function of what a Stage 1 run logged.

Every rule is evaluated and reported (value, threshold, pass/fail), not just the first
failure; the verdict is their conjunction. No MLflow here: `steps/validate.py` gathers the
evidence and `pipeline/tracking/registry.py` acts on the verdict.
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.config import GateConfig
from pipeline.train.health import HEALTH_KEYS, health_floor


# The Stage 1 objectives the gate knows, in one place. A non-collapsing objective is judged by
# its health; `l2_proxy` (its minimum is all-zero features) and any string not listed here get
# the strict rules (loss floor and lr ceiling) rather than a waiver.
KNOWN_OBJECTIVES = frozenset({"vicreg", "l2_proxy", "findings"})
NON_COLLAPSING_OBJECTIVES = frozenset({"vicreg", "findings"})


@dataclass(frozen=True)
class Evidence:
    """What the gate looks at: a run's status/metrics/params, or a bare checkpoint's probe."""

    source: str  # "run" or "checkpoint"
    status: str | None = None
    final_train_loss: float | None = None
    lr: float | None = None
    objective: str | None = None
    health: dict = field(default_factory=dict)
    checkpoint_found: bool = False
    sha256_recorded: str | None = None
    sha256_actual: str | None = None
    source_verdict: str | None = None  # a bare checkpoint: its source run's gate.verdict


@dataclass(frozen=True)
class Rule:
    """One rule's outcome."""

    name: str
    passed: bool
    value: Any
    threshold: Any
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    """The gate's decision and every rule behind it."""

    approved: bool
    rules: tuple[Rule, ...]

    @property
    def reasons(self) -> list[str]:
        return [r.reason for r in self.rules if not r.passed]

    def to_dict(self) -> dict:
        return {"approved": self.approved, "reasons": self.reasons,
                "rules": [asdict(r) for r in self.rules]}


def stored_float(x):
    """A metric as MLflow stored it -> its true value.

    MLflow's SQL stores write +-inf as +-sys.float_info.max (~1.8e308); read back, an infinite
    loss would look finite. No real loss or health value reaches that magnitude.
    """
    if isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) >= sys.float_info.max:
        return math.copysign(math.inf, x)
    return x


def _finite(x) -> bool:
    x = stored_float(x)
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _objective_rules(ev: Evidence, cfg: GateConfig, require_loss: bool = True) -> list[Rule]:
    rules = []
    loss_ok = _finite(ev.final_train_loss)
    if require_loss or ev.final_train_loss is not None:
        rules.append(Rule("final_loss_finite", loss_ok, ev.final_train_loss, "finite",
                          f"final_train_loss is {ev.final_train_loss} (missing or not finite)"))
    if ev.objective not in NON_COLLAPSING_OBJECTIVES:
        # l2_proxy or an unknown objective: apply the strict rules rather than waive them.
        unknown = "" if ev.objective == "l2_proxy" else \
            f"; objective {ev.objective!r} is not one of {sorted(KNOWN_OBJECTIVES)}, judged strictly"
        rules.append(Rule("final_loss_min", loss_ok and ev.final_train_loss >= cfg.min_final_loss,
                          ev.final_train_loss, cfg.min_final_loss,
                          (f"final_train_loss {ev.final_train_loss:.3g} < min_final_loss "
                           f"{cfg.min_final_loss:g} (collapsed l2_proxy)" if loss_ok else
                           "final_train_loss missing") + unknown))
        lr_ok = _finite(ev.lr) and ev.lr <= cfg.max_lr * (1 + 1e-9)
        rules.append(Rule("lr_max", lr_ok, ev.lr, cfg.max_lr,
                          f"lr {ev.lr:g} > max_lr {cfg.max_lr:g} (l2_proxy collapses at high lr)"
                          if _finite(ev.lr) else f"lr is {ev.lr} (not logged)"))
    return rules


def _checkpoint_rules(ev: Evidence, cfg: GateConfig) -> list[Rule]:
    """A bare checkpoint: its own metadata (when it has any) and its source run's verdict."""
    rules = [Rule("source_run_not_rejected", ev.source_verdict != "rejected", ev.source_verdict,
                  "not rejected", "the checkpoint's source run was rejected by the gate")]
    if ev.objective is not None or ev.final_train_loss is not None or ev.lr is not None:
        rules += _objective_rules(ev, cfg, require_loss=False)
    return rules  # a legacy file without metadata is judged by its features alone


def _run_rules(ev: Evidence, cfg: GateConfig) -> list[Rule]:
    rules = [Rule("run_finished", ev.status == "FINISHED", ev.status, "FINISHED",
                  f"run status is {ev.status}, not FINISHED")]
    rules += _objective_rules(ev, cfg)
    sha_ok = ev.checkpoint_found and ev.sha256_recorded is not None and \
        ev.sha256_recorded == ev.sha256_actual
    if not ev.checkpoint_found:
        reason = "checkpoint vision_bridge_final not found in the run's artifacts"
    elif ev.sha256_recorded is None:
        reason = "the run recorded no sha256 for its checkpoint"
    else:
        reason = (f"checkpoint sha256 {str(ev.sha256_actual)[:12]} != recorded "
                  f"{ev.sha256_recorded[:12]} (modified after logging)")
    rules.append(Rule("checkpoint_intact", sha_ok, ev.sha256_actual, ev.sha256_recorded, reason))
    return rules


def _health_rules(ev: Evidence, cfg: GateConfig) -> list[Rule]:
    rules = []
    for key in HEALTH_KEYS:
        floor = health_floor(key, cfg.health)
        value = ev.health.get(key)
        ok = _finite(value) and value >= floor
        rules.append(Rule(f"health_{key}", ok, value, floor,
                          f"{key} {value:.3g} < floor {floor:g} (collapsed features)"
                          if _finite(value) else f"{key} is {value} (not logged)"))
    return rules


def evaluate_gate(ev: Evidence, cfg: GateConfig) -> Verdict:
    """Apply every rule; approved iff all pass."""
    rules = _run_rules(ev, cfg) if ev.source == "run" else _checkpoint_rules(ev, cfg)
    rules += _health_rules(ev, cfg)
    return Verdict(all(r.passed for r in rules), tuple(rules))
