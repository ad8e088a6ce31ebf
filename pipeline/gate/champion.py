"""The champion gate: may `report-vlm@champion` move to an evaluated model?

The rules are a list of (condition -> reason) over one flat dict of what the evaluation measured
(`champion_metrics`: the chosen decoding's scores unprefixed, `blind_*`, `grounding_gap`,
`score`, and `champion_score` when the current champion was measured the same way). Like the
Stage 1 gate (`pipeline.gate.rules`) every rule is evaluated and reported and approval is their
conjunction. A rule is added by appending it to `CHAMPION_RULES`; a metric it reads that was not
measured fails it with that reason. A rule with a `switch` is judged only while that
`ChampionConfig` field is true (`judge_as_written`, `judge_retrieval`).

`decide_champion` is the one place that decides: it judges, records the verdict on the version
that holds the scored file, moves the alias, and returns the outcome as a value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping, Sequence

from pipeline.config import ChampionConfig
from pipeline.gate.rules import Rule, Verdict
from pipeline.tracking import registry
from pipeline.tracking.registry import EvaluatedVersion

Metrics = Mapping[str, float]


@dataclass(frozen=True)
class ChampionRule:
    """One rule: `condition(metrics, cfg)` must hold, else `reason(metrics, cfg)` says why."""

    name: str
    condition: Callable[[Metrics, ChampionConfig], bool]
    reason: Callable[[Metrics, ChampionConfig], str]
    value: str = ""  # the metric reported beside the verdict
    switch: str = ""  # a ChampionConfig bool field; when false, the rule is not judged

    def applies(self, cfg: ChampionConfig) -> bool:
        """Whether `cfg` asks for this rule."""
        return not self.switch or bool(getattr(cfg, self.switch))


def _beats(key: str, baseline: str) -> Callable[[Metrics, ChampionConfig], bool]:
    """Strictly above the baseline's value, or both perfect (1.0: nothing can beat it)."""
    return lambda m, c: m[key] > m[f"{baseline}_{key}"] or m[key] >= 1.0


CHAMPION_RULES: tuple[ChampionRule, ...] = (
    ChampionRule("reads_image", lambda m, c: m["grounding_gap"] >= c.min_grounding_gap,
                 lambda m, c: f"grounding gap {m['grounding_gap']:.4f} < "
                              f"{c.min_grounding_gap:g} nats: the reports do not depend on the "
                              "image", "grounding_gap"),
    ChampionRule("beats_blind_baseline",
                 lambda m, c: m["finding_coarse_macro_f1"]
                 >= m["blind_finding_coarse_macro_f1"] + c.min_margin_over_blind,
                 lambda m, c: f"coarse finding F1 {m['finding_coarse_macro_f1']:.3f} < blind "
                              f"baseline {m['blind_finding_coarse_macro_f1']:.3f} + margin "
                              f"{c.min_margin_over_blind:g}", "finding_coarse_macro_f1"),
    ChampionRule("beats_blind_chexpert",
                 lambda m, c: m["chexpert_micro_f1"] > m["blind_chexpert_micro_f1"],
                 lambda m, c: f"CheXpert-14 micro F1 {m['chexpert_micro_f1']:.3f} <= the blind "
                              f"baseline's {m['blind_chexpert_micro_f1']:.3f}",
                 "chexpert_micro_f1"),
    # The text must read as a radiology report, not only name the findings.
    ChampionRule("writes_like_reports_bleu", lambda m, c: m["bleu4"] >= m["blind_bleu4"],
                 lambda m, c: f"BLEU-4 {m['bleu4']:.3f} < the constant report's "
                              f"{m['blind_bleu4']:.3f}: printing one report for every study "
                              "reads closer to the references", "bleu4"),
    ChampionRule("writes_like_reports_cider", lambda m, c: m["cider"] >= m["blind_cider"],
                 lambda m, c: f"CIDEr {m['cider']:.3f} < the constant report's "
                              f"{m['blind_cider']:.3f}", "cider"),
    ChampionRule("report_form",
                 lambda m, c: m["report_form"] >= c.min_report_form * m["reference_report_form"],
                 lambda m, c: f"report form {m['report_form']:.3f} < {c.min_report_form:g} x the "
                              f"references' {m['reference_report_form']:.3f}: sentences no "
                              "training report resembles (invented histories, measurements, "
                              "assistant text)", "report_form"),
    ChampionRule("no_self_contradiction",
                 lambda m, c: m["contradiction_share"] <= c.max_contradiction_share,
                 lambda m, c: f"{m['contradiction_share']:.1%} of the reports assert and deny the "
                              f"same finding (at most {c.max_contradiction_share:.0%})",
                 "contradiction_share"),
    ChampionRule("no_chat_preamble", lambda m, c: m["preamble_share"] <= c.max_preamble_share,
                 lambda m, c: f"{m['preamble_share']:.1%} of the reports open as a chat "
                              f"assistant's answer (at most {c.max_preamble_share:.0%})",
                 "preamble_share"),
    # The text as the LLM wrote it, before the repair: the rule above judges the served text,
    # which the repair can make consistent by deletion.
    ChampionRule("no_self_contradiction_as_written",
                 lambda m, c: m["contradiction_share_as_written"]
                 <= c.max_contradiction_share_as_written,
                 lambda m, c: f"{m['contradiction_share_as_written']:.1%} of the reports "
                              "contradict themselves as written, before any repair (at most "
                              f"{c.max_contradiction_share_as_written:.0%})",
                 "contradiction_share_as_written", "judge_as_written"),
    ChampionRule("seldom_repaired", lambda m, c: m["repaired_share"] <= c.max_repaired_share,
                 lambda m, c: f"the contradiction repair edited {m['repaired_share']:.1%} of the "
                              f"reports (at most {c.max_repaired_share:.0%})",
                 "repaired_share", "judge_as_written"),
    # The training report nearest to the head's findings: a writer that cannot beat printing
    # it has no reason to generate.
    ChampionRule("beats_retrieval_chexpert", _beats("chexpert_micro_f1", "retrieval"),
                 lambda m, c: f"CheXpert-14 micro F1 {m['chexpert_micro_f1']:.3f} <= the "
                              f"retrieval baseline's {m['retrieval_chexpert_micro_f1']:.3f}",
                 "chexpert_micro_f1", "judge_retrieval"),
    ChampionRule("beats_retrieval_coarse", _beats("finding_coarse_macro_f1", "retrieval"),
                 lambda m, c: f"coarse finding F1 {m['finding_coarse_macro_f1']:.3f} <= the "
                              "retrieval baseline's "
                              f"{m['retrieval_finding_coarse_macro_f1']:.3f}",
                 "finding_coarse_macro_f1", "judge_retrieval"),
    # `champion_score` is there only when the champion was measured the same way (data digest,
    # split size, decoding, beam width, candidates): one measured otherwise does not block.
    ChampionRule("beats_champion",
                 lambda m, c: "champion_score" not in m or m["score"] > m["champion_score"],
                 lambda m, c: f"score {m['score']:.4f} <= the champion's "
                              f"{m['champion_score']:.4f} on the same data, split size and "
                              "decoding", "score"),
)


def comparison_key(data_digest: str, n_studies: int, decoding: str, num_beams: int = 1,
                   n_candidates: int = 1) -> str:
    """What two evaluations must share for their scores to be compared."""
    return f"{data_digest}|n={n_studies}|{decoding}|beams={num_beams}|candidates={n_candidates}"


def champion_metrics(metrics: Metrics, decoding: str) -> dict[str, float]:
    """An evaluation's metrics as the rules read them: `{decoding}_x` becomes `x`."""
    prefix = f"{decoding}_"
    return {**metrics, **{k.removeprefix(prefix): v for k, v in metrics.items()
                          if k.startswith(prefix)}}


def _comparable(champion: EvaluatedVersion | None, key: str) -> bool:
    return champion is not None and champion.key == key and champion.score is not None


def judge_champion(metrics: Metrics, cfg: ChampionConfig = ChampionConfig(),
                   champion: EvaluatedVersion | None = None, key: str = "",
                   rules: Sequence[ChampionRule] = CHAMPION_RULES) -> Verdict:
    """Every rule `cfg` asks for on `metrics` (and the champion's score when comparable);
    approved iff all pass. A rule whose metric is missing or not a number fails."""
    m = dict(metrics)
    if _comparable(champion, key):
        m["champion_score"] = champion.score
    judged = []
    for rule in (r for r in rules if r.applies(cfg)):
        try:
            passed = bool(rule.condition(m, cfg))
            reason = "" if passed else rule.reason(m, cfg)
        except KeyError as missing:
            passed, reason = False, f"{rule.name}: {missing.args[0]} was not measured"
        except TypeError:  # None where a number belongs
            passed, reason = False, f"{rule.name}: a metric it reads is not a number"
        judged.append(Rule(rule.name, passed, m.get(rule.value), None, reason))
    return Verdict(all(r.passed for r in judged), tuple(judged))


@dataclass(frozen=True)
class Evaluation:
    """What the decision needs from an evaluation."""

    metrics: Metrics  # as `champion_metrics` returns them
    key: str  # `comparison_key`
    checkpoint: Path  # the file that was scored
    source_run: str | None  # the Stage 2 run it came from
    score_definition: str = ""
    description: str = ""  # the version's page in the UI, below the verdict
    sample: str = ""  # one generated report, for the registered model's page


@dataclass(frozen=True)
class ChampionOutcome:
    """What the decision did."""

    version: str | None  # the `report-vlm` version holding the scored file (None: not recorded)
    moved: bool  # `champion` now points at `version`
    reasons: tuple[str, ...] = ()  # why not
    champion: str | None = None  # the champion after the decision
    verdict: Verdict | None = None  # None: not judged
    was_champion: bool = False  # `version` held the alias when the evaluation began

    @property
    def label(self) -> str:
        """`champion`, `confirmed` (the champion re-evaluated and passing), `removed` (the
        champion re-evaluated and failing: the alias is off it), `rejected`, `outranked`
        (approved, a better one won) or `not judged`."""
        if self.was_champion and self.verdict is not None:
            return "confirmed" if self.verdict.approved else "removed"
        if self.moved:
            return "champion"
        if self.verdict is None:
            return "not judged"
        return "outranked" if self.verdict.approved else "rejected"

    @property
    def message(self) -> str:
        """One line saying what happened."""
        if self.label == "confirmed":
            return f"champion confirmed: report-vlm version {self.version} passes every rule " \
                   "again (its evidence is refreshed)"
        if self.label == "removed":
            return f"champion removed: report-vlm version {self.version} no longer passes the " \
                   "champion gate: " + "; ".join(self.reasons)
        if self.moved:
            return f"champion -> report-vlm version {self.version}"
        what = f"report-vlm version {self.version} {self.label}" if self.version else self.label
        return f"champion unchanged: {what}: " + "; ".join(self.reasons)


def not_judged(reason: str) -> ChampionOutcome:
    """An evaluation that cannot move the champion (a partial split, for example)."""
    return ChampionOutcome(None, False, (reason,))


def decide_champion(evaluation: Evaluation, cfg: ChampionConfig = ChampionConfig(),
                    rules: Sequence[ChampionRule] = CHAMPION_RULES) -> ChampionOutcome:
    """Judge an evaluation; record the verdict on the `report-vlm` version that holds the
    scored file (registered now if none does); move `champion` there when approved.

    An evaluation of the champion itself is not compared with its own earlier score: it
    confirms the champion (its evidence refreshed), or, failing a rule now, takes the alias
    off it. The champion is read first: a registry that does not answer raises before
    anything is tagged.
    """
    current = registry.champion_state()
    before = current.version if current else None
    if evaluation.source_run is None:
        verdict = judge_champion(evaluation.metrics, cfg, current, evaluation.key, rules)
        return ChampionOutcome(None, False, ("the checkpoint names no Stage 2 run to register "
                                             "it under",), before, verdict)
    version = registry.report_version_holding(evaluation.checkpoint, evaluation.source_run)
    itself = before == version
    verdict = judge_champion(evaluation.metrics, cfg, None if itself else current,
                             evaluation.key, rules)
    read = registry.no_champion_token() if current is None else current.token
    m = evaluation.metrics
    tags = {"eval.score": repr(float(m["score"])), "eval.key": evaluation.key,
            "eval.score_definition": evaluation.score_definition,
            "eval.at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            registry.RACE_TAG: read,
            "champion.verdict": "approved" if verdict.approved else "rejected",
            "champion.reasons": "; ".join(verdict.reasons)[:4000],
            **{f"eval.{name}": f"{m.get(key, math.nan):.3f}" for name, key in _SUMMARY}}
    registry.record_evaluation(version, tags, _verdict_line(verdict) + "\n\n"
                               + evaluation.description)
    if itself:  # confirmed, or taken off (unless another evaluation has moved it since)
        champion = registry.alias_version(registry.REPORT_MODEL, registry.CHAMPION_ALIAS) \
            if verdict.approved else registry.remove_champion(version)
    else:
        champion = _settle(version, evaluation.key, read) if verdict.approved else before
    registry.describe_report_model(_model_page(version, champion, verdict, tags,
                                               evaluation.sample))
    moved = verdict.approved and champion == version
    reasons = tuple(verdict.reasons) if not verdict.approved else () if moved else \
        (f"version {champion} scored higher, measured the same way, in an evaluation that "
         f"ran at the same time (both judged against the champion {read})",)
    return ChampionOutcome(version, moved, reasons, champion, verdict, itself)


_SUMMARY = (("coarse_f1", "finding_coarse_macro_f1"),
            ("blind_coarse_f1", "blind_finding_coarse_macro_f1"),
            ("grounding_gap", "grounding_gap"))
SETTLE_ROUNDS = 5


def _settle(version: str, key: str, read: str) -> str | None:
    """Point `champion` at `version`, then keep it on the best version among those whose
    evaluations raced this one: measured with `key` and judged against the same champion
    (`read`).

    Two evaluations that read the same old champion may both pass and both set the alias. Each
    tags its version before setting it, and checks after setting it: the one that sets it last
    then sees every rival's score and restores the best. A version approved earlier, against
    another champion, never takes part: it was not compared with the champion this evaluation
    read. A champion measured otherwise, or set since by an evaluation that read another
    champion, is left alone.
    """
    target = version
    holder = None
    for _ in range(SETTLE_ROUNDS):
        registry.set_champion(target)
        holder = registry.champion_state()
        if holder is None or holder.key != key or holder.read != read:
            break
        racers = [v for v in registry.evaluated_versions(key) if v.read == read]
        target = best_version(racers, holder)
        if target == holder.version:
            break
    return holder.version if holder else None


def best_version(rivals: Sequence[EvaluatedVersion], holder: EvaluatedVersion) -> str:
    """The champion among the approved `rivals` and the current `holder` (all measured the same
    way): the highest score; a tie keeps the holder, else the earliest version."""
    pool = [v for v in rivals if v.verdict == "approved" and v.score is not None
            and v.version != holder.version]
    if holder.score is not None:
        pool.append(holder)
    if not pool:
        return holder.version
    top = max(v.score for v in pool)
    if holder.score == top:
        return holder.version
    return min((v for v in pool if v.score == top), key=lambda v: int(v.version)).version


def _verdict_line(verdict: Verdict) -> str:
    return f"**champion gate: {'approved' if verdict.approved else 'rejected'}**" + \
        (f" ({'; '.join(verdict.reasons)})" if verdict.reasons else "")


def _model_page(version: str, champion: str | None, verdict: Verdict,
                tags: Mapping[str, str], sample: str) -> str:
    """The registered model's page: the champion, and the latest evaluation's verdict,
    grounding gap and a sample report (its version's page has every score)."""
    lines = [f"**champion: version {champion}**" if champion else
             "**champion: none** (no version has passed the champion gate, or the last champion "
             "failed it when evaluated again)", "",
             f"Latest evaluation: version {version}, champion gate: "
             f"**{tags['champion.verdict']}**"
             + (f" ({tags['champion.reasons']})" if not verdict.approved else ""), "",
             f"- grounding gap: {tags['eval.grounding_gap']} nats (caption loss with "
             "another study's image minus with its own)",
             f"- coarse finding F1: {tags['eval.coarse_f1']} (blind baseline "
             f"{tags['eval.blind_coarse_f1']})"]
    if sample:
        lines += [f"- sample report: {sample[:1000]}"]
    return "\n".join(lines)[:5000]
