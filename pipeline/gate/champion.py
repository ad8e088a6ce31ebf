"""The champion gate: may `report-vlm@champion` move to an evaluated model?

A pure function of what an evaluation measured and what the current champion holds, like the
Stage 1 gate (`pipeline.gate.rules`): every rule is evaluated and reported; approval is their
conjunction. The rules: the model reads the image (grounding gap above its floor), its coarse
finding F1 beats the blind baseline by a margin, and its score beats the current champion's
when both were measured the same way (same data digest, split size and decoding; a champion
measured otherwise cannot be compared and does not block).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import ChampionConfig
from pipeline.gate.rules import Rule, Verdict


@dataclass(frozen=True)
class ChampionEvidence:
    """An evaluation's numbers and the current champion's (None when there is none)."""

    coarse_f1: float
    blind_coarse_f1: float
    grounding_gap: float
    score: float
    comparison_key: str  # data digest | split size | decoding
    champion_version: str | None = None
    champion_score: float | None = None
    champion_key: str | None = None


def comparison_key(data_digest: str, n_studies: int, decoding: str) -> str:
    """What two evaluations must share for their scores to be compared."""
    return f"{data_digest}|n={n_studies}|{decoding}"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def judge_champion(ev: ChampionEvidence, cfg: ChampionConfig) -> Verdict:
    """Every champion rule on `ev`; approved iff all pass."""
    floor = ev.blind_coarse_f1 + cfg.min_margin_over_blind if _number(ev.blind_coarse_f1) else math.nan
    rules = [
        Rule("reads_image", _number(ev.grounding_gap) and ev.grounding_gap >= cfg.min_grounding_gap,
             ev.grounding_gap, cfg.min_grounding_gap,
             f"grounding gap {ev.grounding_gap:.4f} < {cfg.min_grounding_gap:g} nats: the "
             "reports do not depend on the image"),
        Rule("beats_blind_baseline", _number(ev.coarse_f1) and _number(floor) and ev.coarse_f1 >= floor,
             ev.coarse_f1, floor,
             f"coarse finding F1 {ev.coarse_f1:.3f} < blind baseline {ev.blind_coarse_f1:.3f} + "
             f"margin {cfg.min_margin_over_blind:g}"),
    ]
    comparable = ev.champion_version is not None and ev.champion_key == ev.comparison_key \
        and _number(ev.champion_score)
    if comparable:
        rules.append(Rule("beats_champion", _number(ev.score) and ev.score > ev.champion_score,
                          ev.score, ev.champion_score,
                          f"score {ev.score:.4f} <= champion version {ev.champion_version}'s "
                          f"{ev.champion_score:.4f} on the same data, split size and decoding"))
    else:
        note = "no champion yet" if ev.champion_version is None else \
            f"champion version {ev.champion_version} was measured differently"
        rules.append(Rule("beats_champion", True, ev.score, note))
    return Verdict(all(r.passed for r in rules), tuple(rules))
