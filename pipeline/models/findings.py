"""Finding supervision read from reports: targets, the classification head, prompt words.

Labels come from the labeler (`pipeline.data.labeler`, a view on the CheXpert-14 engine's
mentions) applied to each training report, so any dataset with reports works with no extra
annotation; an uncertain mention counts as the policy `uncertain` says (`positive`: U-ones,
`negative`: U-zeros, `ignore`: masked from the loss; `DataConfig.uncertain`). The head
predicts the fine labels and the coarse groups (any side or zone) from the encoder tokens
pooled to a few cells; the coarse logits decide which groups are present, the fine ones where
(classify-then-generate: the predicted findings become plain words in the frozen LLM's
prompt). How findings are scored lives in `pipeline.data.finding_metrics`.

The head learns with positive-weighted BCE (`positive_weights`): a rare label's probability
comes out inflated by its weight, which is what a group's presence wants (recall counts for
F1), but not which of a group's members are present: at 128 px the head gave most films with
a device all three device kinds, a set no reference has and the writer then garbles. So the
fine decisions take the weights back out (`FindingHead.fine_prior`, log of each fine label's
training weight, saved with the head): a member is present when its odds, as trained without
weights, are even.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch
from torch import Tensor, nn

from pipeline.data.labeler import (COARSE_FINDINGS, FINDINGS, STATED_ORDER, UNCERTAIN_POLICIES,
                                   UNLOCALISED, coarse_group, coarse_labels, label_report,
                                   uncertain_findings)
from pipeline.device import to_device

FINE = tuple(name for name in FINDINGS if name != "no_finding")  # no_finding is derived
COARSE = tuple(name for name in COARSE_FINDINGS if name != "no_finding")
HEAD_OUTPUTS = len(FINE) + len(COARSE)  # fine logits first, then coarse


class FindingHead(nn.Module):
    """(B, N, d) encoder tokens on a square, row-major grid -> (B, HEAD_OUTPUTS) logits.

    The tokens are average-pooled to `grid` x `grid` cells, each cell is normalised, and one
    linear layer reads every cell, so where a finding lies (its side and zone) stays visible
    to the head. `grid=1` is the mean of all tokens: the head of checkpoints from before the
    cells, with the same tensors.
    """

    def __init__(self, dim: int, grid: int = 1):
        super().__init__()
        if grid < 1:
            raise ValueError(f"finding head grid must be >= 1, got {grid}")
        self.grid = grid
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim * grid * grid, HEAD_OUTPUTS)
        # log of each fine label's BCE positive weight; zeros (checkpoints from before) decide
        # on the weighted probabilities as they are
        self.register_buffer("fine_prior", torch.zeros(len(FINE)))

    def set_prior(self, pos_weight: Tensor) -> None:
        """Record the positive weights the head trains with (`positive_weights`), so that its
        fine decisions can take them back out."""
        # a label in every training report has weight 0: its prior stays finite (log 1e-3)
        weight = pos_weight[:len(FINE)].to(self.fine_prior).clamp(min=1e-3)
        self.fine_prior.copy_(torch.log(weight))

    def forward(self, tokens: Tensor) -> Tensor:
        if self.grid == 1:
            cells = tokens.mean(dim=1, keepdim=True)
        else:
            batch, count, dim = tokens.shape
            side = math.isqrt(count)
            if side * side != count:
                raise ValueError(f"finding head: {count} tokens are not a square grid")
            grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
            cells = nn.functional.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)
        return self.linear(self.norm(cells).flatten(1))


def head_grid(tensors: dict[str, Tensor], prefix: str) -> int | None:
    """The cell grid of the finding head whose weights start with `prefix` (None without one)."""
    weight, norm = tensors.get(prefix + "linear.weight"), tensors.get(prefix + "norm.weight")
    if weight is None or norm is None:
        return None
    return math.isqrt(int(weight.shape[1]) // int(norm.shape[0]))


@lru_cache(maxsize=65536)
def _target_row(report: str, uncertain: str = "positive"
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(targets, mask) of one report: `ignore` reads U-zeros and masks what U-ones reads
    differently (`uncertain_findings`)."""
    values = "negative" if uncertain == "ignore" else uncertain
    fine, coarse = label_report(report, values), coarse_labels(report, values)
    masked = uncertain_findings(report) if uncertain == "ignore" else set()
    names = (*FINE, *COARSE)
    row = tuple(float(fine[n]) for n in FINE) + tuple(float(coarse[n]) for n in COARSE)
    return row, tuple(float(n not in masked) for n in names)


def _check_policy(uncertain: str) -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")


def finding_targets(reports: Sequence[str], uncertain: str = "positive") -> Tensor:
    """(B, HEAD_OUTPUTS) 0/1 targets read from the reports by the labeler; an uncertain
    mention counts as `uncertain` says (`ignore`: as absent, and masked: `finding_mask`)."""
    _check_policy(uncertain)
    return torch.tensor([_target_row(r, uncertain)[0] for r in reports], dtype=torch.float32)


def finding_mask(reports: Sequence[str], uncertain: str = "positive") -> Tensor:
    """(B, HEAD_OUTPUTS) 1 where a target counts in the loss, 0 where `uncertain="ignore"`
    leaves it out (its value depends on how an uncertain mention is read)."""
    _check_policy(uncertain)
    return torch.tensor([_target_row(r, uncertain)[1] for r in reports], dtype=torch.float32)


def positive_weights(reports: Sequence[str], max_weight: float = 10.0,
                     uncertain: str = "positive") -> Tensor:
    """BCE positive weights (negatives / positives per output, capped) over training reports,
    masked targets left out."""
    targets = finding_targets(reports, uncertain)
    if uncertain == "ignore":
        mask = finding_mask(reports, uncertain)
        share = (targets * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1)
    else:
        share = targets.mean(dim=0)
    share = share.clamp(min=1e-3)
    return ((1 - share) / share).clamp(max=max_weight)


def finding_loss(logits: Tensor, reports: Sequence[str], pos_weight: Tensor | None,
                 uncertain: str = "positive") -> Tensor:
    """BCE of finding logits against the labeler's reading of the reports; with
    `uncertain="ignore"`, the mean over the targets that count (`finding_mask`)."""
    # Built on the host from the report text; copied without waiting for the GPU's queue.
    targets = to_device(finding_targets(reports, uncertain), logits.device)
    weight = to_device(pos_weight, logits.device) if pos_weight is not None else None
    if uncertain != "ignore":
        return nn.functional.binary_cross_entropy_with_logits(logits, targets,
                                                              pos_weight=weight)
    mask = to_device(finding_mask(reports, uncertain), logits.device)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight,
                                                          reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def decision_logits(logits: Tensor, fine_prior: Tensor | None = None) -> Tensor:
    """The logits decoding compares with its threshold, on the CPU: the fine ones less
    `fine_prior` (`FindingHead.fine_prior`), the coarse ones as they are."""
    logits = logits.detach().float()
    if fine_prior is not None:  # taken off where the logits are: one copy to the host, not two
        logits = torch.cat([logits[:, :len(FINE)] - fine_prior.float().to(logits.device),
                            logits[:, len(FINE):]], dim=1)
    return logits.cpu()


def decode_findings(logits: Tensor, threshold: float = 0.5,
                    fine_prior: Tensor | None = None) -> list[dict[str, int]]:
    """Fine labels per row: a coarse group present -> its fine labels over threshold, or its
    most likely one (a group the head sees but cannot place still gets its best guess).
    `fine_prior` (`FindingHead.fine_prior`) is taken off the fine logits first."""
    probs = torch.sigmoid(decision_logits(logits, fine_prior))
    out = []
    for row in probs:
        fine_p, coarse_p = row[:len(FINE)], row[len(FINE):]
        labels = dict.fromkeys(FINDINGS, 0)
        for group, p in zip(COARSE, coarse_p):
            if p < threshold:
                continue
            members = [i for i, name in enumerate(FINE) if coarse_group(name) == group]
            chosen = [i for i in members if fine_p[i] >= threshold] or \
                [max(members, key=lambda i: float(fine_p[i]))]
            for i in chosen:
                labels[FINE[i]] = 1
        labels["no_finding"] = int(not any(labels.values()))
        out.append(labels)
    return out


_GROUP_WORDS = {"cardiomegaly": "cardiomegaly", "effusion": "pleural effusion",
                "pneumothorax": "pneumothorax", "nodule": "nodule", "consolidation": "consolidation",
                "enlarged_cardiomediastinum": "widened mediastinum",
                "atelectasis": "basilar atelectasis", "opacity": "hazy lung opacity",
                "fracture": "rib fracture", "edema": "pulmonary edema",
                "devices": "support devices"}


_STATED_RANK = {group: i for i, group in enumerate(STATED_ORDER)}
_DEVICE_WORDS = {"devices_tube": "endotracheal tube", "devices_line": "central line",
                 "devices_pacemaker": "pacemaker"}


def _phrase(name: str) -> str:
    if name in _DEVICE_WORDS:
        return _DEVICE_WORDS[name]
    group = coarse_group(name)
    if group == name:
        return _GROUP_WORDS[name]
    kind, *place = name.split("_")
    if kind in ("nodule", "consolidation"):
        return f"{kind} in the {place[0]} {place[1]} zone"
    return f"{place[0]} {_GROUP_WORDS[kind]}"


def findings_text(labels: dict[str, int], absent: bool = False) -> str:
    """Findings as prompt words: "Findings: cardiomegaly; left pleural effusion." / "none".

    With `absent`, the groups not found follow ("Absent: pneumothorax, nodule."): a small LM
    then writes its negative sentences from the prompt instead of its most frequent ones,
    which otherwise deny the very findings it writes later in the report.
    """
    named = [(n, _phrase(n)) for n in FINE if labels.get(n)]
    named += [(n, _GROUP_WORDS[coarse_group(n)]) for n, v in labels.items()
              if v and n in UNLOCALISED and coarse_group(n) in _GROUP_WORDS]
    named.sort(key=lambda pair: _STATED_RANK[coarse_group(pair[0])])  # stable: FINE order within
    present = [words for _, words in named]
    text = "Findings: " + ("; ".join(present) if present else "none") + "."
    if absent:
        found = {coarse_group(n) for n, v in labels.items() if v and n != "no_finding"}
        missing = [words for group, words in _GROUP_WORDS.items() if group not in found]
        text += " Absent: " + (", ".join(missing) if missing else "none") + "."
    return text
