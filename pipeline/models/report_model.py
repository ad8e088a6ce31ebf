"""The report model's one path from image to text: vision-bridge -> [visual][prompt] -> LLM.

Training, validation, the grounding gap, evaluation and serving all go through `prompts_for`
and `caption_forward` / `generate_reports`, so everything the model derives from an image
(its visual tokens and, with `findings`, the predicted findings written into its prompt) is
derived the same way everywhere. With `findings`, training prompts may carry the findings the
labeler reads from the true report instead (teacher forcing); nothing outside the LLM ever
writes report text.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from transformers import LogitsProcessorList

from pipeline import config as C
from pipeline.data.finding_metrics import disagreement
from pipeline.data.labeler import to_coarse
from pipeline.data.report_text import contradictions, findings_first_parts, resolve_contradictions
from pipeline.device import cpu_bf16_region, to_device, to_storage
from pipeline.models import captioning
from pipeline.models.faithful_decoding import FindingsConstraint
from pipeline.models.findings import findings_text


def prompts_for(prompt: str, n: int, labels: Sequence[dict] | None = None,
                absent: bool = False) -> list[str]:
    """One prompt per sample: the findings (true ones, or the head's decoded ones) as words
    before `prompt`; just `prompt` when the model has no findings."""
    if labels is None:
        return [prompt] * n
    return [f"{findings_text(lab, absent)}\n{prompt}" for lab in labels]


def uses_findings(cfg: C.Stage2Config, model) -> bool:
    """Classify-then-generate: asked for by the config and possible for the model (a model
    saved before finding heads existed writes from its visual tokens alone)."""
    return bool(cfg.findings and getattr(model, "has_findings", False))


@dataclass
class CaptionOutput:
    """Caption loss of one batch and what it was computed from."""

    loss: torch.Tensor
    logits: torch.Tensor | None  # finding logits (None without a finding head)
    visual: torch.Tensor
    layout: captioning.Layout
    labels: torch.Tensor
    # What training minimises and the total weight of its tokens: the loss and the supervised
    # token count, unless findings_weight weighs the stated findings' tokens apart.
    objective: torch.Tensor | None = None
    weight: float | None = None


def caption_forward(model, llm, images: torch.Tensor, reports: Sequence[str], cfg: C.Stage2Config,
                    true_labels: Sequence[dict] | None = None,
                    label_fn: Callable = captioning.make_labels,
                    training: bool = False) -> CaptionOutput:
    """Caption cross-entropy of `reports` given `images`, through the inference path;
    `training`: also the objective, with the stated findings weighed by `findings_weight`."""
    if uses_findings(cfg, model):
        visual, logits = model.forward_with_findings(images)
    else:
        visual, logits, true_labels = model(images), None, None
    if true_labels is None and logits is not None:
        true_labels = model.decode_findings(logits)
    prompts = prompts_for(cfg.prompt, len(reports), true_labels, cfg.prompt_absent)
    parts = [findings_first_parts(r) for r in reports] if cfg.findings_first else None
    if parts is not None:
        reports = [" ".join(first + rest) for first, rest in parts]
    layout = captioning.tokenize_batch(llm.tokenizer, prompts, list(reports), llm.eos_token_id,
                                       llm.pad_token_id, visual.shape[1], cfg.max_report_tokens,
                                       cfg.system_prompt)
    # Labels are built on the host from the token ids and stay there for the label-mask guard
    # and the token counts (reading them on a GPU would be a sync); the loss gets a copy on
    # the visual tokens' device.
    labels = label_fn(layout)
    targets = to_device(labels, visual.device)
    embeds, mask = captioning.assemble(visual, layout, llm.embed)
    if not (training and parts is not None and cfg.findings_weight != 1.0):
        loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=targets).loss
        return CaptionOutput(loss, logits, visual, layout, labels)
    stated = [len(llm.tokenizer(" " + " ".join(first), add_special_tokens=False)["input_ids"])
              if first else 0 for first, _ in parts]
    weights = captioning.token_weights(layout, stated, cfg.findings_weight)
    total = captioning.total_weight(labels, weights)
    token_logits = llm(inputs_embeds=embeds, attention_mask=mask).logits
    loss, objective, weight = captioning.weighted_caption_loss(
        token_logits, targets, to_device(weights, visual.device), total)
    return CaptionOutput(loss, logits, visual, layout, labels, objective, weight)


@torch.no_grad()
def grounding_losses(model, llm, images: torch.Tensor, reports: Sequence[str],
                     cfg: C.Stage2Config, batch_size: int = 16) -> tuple[float, float]:
    """(mean caption loss with each report's own image, with the images shifted by one study).

    Same batches and reports on both sides; only the images move, and with them everything
    the model derives from them. A model that ignores the image has a gap of ~0.
    """
    was_training = model.training
    model.eval()
    shifted = torch.roll(images, shifts=1, dims=0)
    own_sum = shifted_sum = 0.0
    n = len(reports)
    for start in range(0, n, batch_size):
        part = list(reports[start:start + batch_size])
        weight = len(part) / n
        with cpu_bf16_region(images.device, getattr(cfg, "cpu_bf16", False)):
            own_sum += weight * float(caption_forward(
                model, llm, images[start:start + batch_size], part, cfg).loss)
            shifted_sum += weight * float(caption_forward(
                model, llm, shifted[start:start + batch_size], part, cfg).loss)
    model.train(was_training)
    return own_sum, shifted_sum


def image_seed(seed: int, image: torch.Tensor) -> int:
    """A sampling seed from `seed` and the image's own bytes: an image draws the same samples
    alone or anywhere in any batch."""
    data = to_storage(image).float().contiguous().numpy().tobytes()
    digest = hashlib.sha256(str(int(seed)).encode() + b":" + data).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes < 2**63


def _samples(llm, visual: torch.Tensor, prompt_ids, seed: int, samples: int,
             max_new_tokens: int, temperature: float, generate_kwargs: dict,
             constraint: Callable[..., list] | None = None) -> list[str]:
    """`samples` sampled reports for one image, laid out as if it were alone (no padding)."""
    embeds, mask = captioning.prompt_only(visual, [prompt_ids], llm.pad_token_id, llm.embed)
    if constraint is not None:
        generate_kwargs = {**generate_kwargs, "logits_processor": constraint(samples, True)}
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the caller's random state stays as it was
        return llm.generate(embeds, mask, max_new_tokens=max_new_tokens, do_sample=True,
                            temperature=temperature, num_return_sequences=samples,
                            **generate_kwargs)


@torch.no_grad()
def generate_candidates(model, llm, images: torch.Tensor, prompt: str, max_new_tokens: int,
                        num_beams: int = 1, batch_size: int = 16, findings: bool = False,
                        samples: int = 0, seed: int = 0, temperature: float = 0.7,
                        system: str | None = None, absent: bool = False,
                        constrain: bool = False, vocabulary: Iterable[str] = (),
                        **generate_kwargs) -> tuple[list[list[str]], list[dict] | None]:
    """Candidate reports per image: `num_beams` beams, best first (one, greedy, when num_beams
    == 1), then `samples` sampled ones (seeded per image by `image_seed`: an image gets the
    same candidates alone or anywhere in any batch), and the findings each image's prompt was
    given (None without findings). With findings and `constrain`, every candidate is written
    under `FindingsConstraint` (no sentence denying a given finding or asserting another;
    `vocabulary`: the training reports' words)."""
    model.eval()
    generate_kwargs.setdefault("no_repeat_ngram_size", C.Stage2Config.no_repeat_ngram_size)
    candidates: list[list[str]] = []
    given: list[dict] = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        if findings:
            visual, logits = model.forward_with_findings(chunk)
            labels = model.decode_findings(logits)
            given += labels
        else:
            visual, labels = model(chunk), None
        prompts = prompts_for(prompt, chunk.shape[0], labels, absent=absent)
        prompt_ids = [captioning.encode_prompt(llm.tokenizer, p, system) for p in prompts]
        embeds, mask = captioning.prompt_only(visual, prompt_ids, llm.pad_token_id, llm.embed)
        constraint = _constraint(llm, labels, vocabulary) if findings and constrain else None
        extra = {} if constraint is None else \
            {"logits_processor": constraint(num_beams, False, range(len(labels)))}
        texts = llm.generate(embeds, mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                             num_return_sequences=num_beams, **generate_kwargs, **extra)
        rows = [texts[i:i + num_beams] for i in range(0, len(texts), num_beams)]
        if samples:
            rows = [row + _samples(llm, visual[i:i + 1], prompt_ids[i], image_seed(seed, image),
                                   samples, max_new_tokens, temperature, generate_kwargs,
                                   None if constraint is None else
                                   lambda n, sampling, i=i: constraint(n, sampling, [i]))
                    for i, (row, image) in enumerate(zip(rows, chunk))]
        candidates += [[text.strip() for text in row] for row in rows]
    return candidates, (given if findings else None)


def _constraint(llm, labels: Sequence[dict], vocabulary: Iterable[str]) -> Callable[..., list]:
    """(rows per prompt, sampling, prompts) -> the logits processors that write those prompts'
    rows under `FindingsConstraint`."""
    words = tuple(vocabulary)

    def build(rows_per_prompt: int, sampling: bool, prompts) -> list:
        return LogitsProcessorList([FindingsConstraint(
            llm.tokenizer, [labels[i] for i in prompts], rows_per_prompt, words,
            width=16 if sampling else 1 if rows_per_prompt == 1 else 2 * rows_per_prompt,
            sampling=sampling, eos=llm.eos_token_id)])
    return build


def report_token_limit(tokenizer, reports: Sequence[str], room: float = 1.1) -> int:
    """New tokens enough for the longest of `reports` (and EOS), with 10% room: generation
    that runs past every reference has stopped writing a report."""
    longest = max((len(tokenizer(r.strip(), add_special_tokens=False)["input_ids"])
                   for r in reports), default=0)
    return int(longest * room) + 2


def choice_key(report: str, labels: dict | None, style=None) -> tuple:
    """How a candidate ranks (lower is better): self-contradiction first, then the findings'
    disagreement with `labels` (coarse, fine), then the share of its sentences out of the
    training reports' form (with a `style`)."""
    form = 0.0
    if style is not None:
        in_form, n = style.form(report)
        form = 1.0 - (in_form / n if n else 0.0)
    diff = disagreement(report, labels) if labels is not None else (0, 0)
    return (bool(contradictions(report)), *diff, form)


def choose_reports(candidates: Sequence[Sequence[str]], given: Sequence[dict] | None,
                   by_findings: bool = True, style=None, repair: bool = False) -> list[str]:
    """One report per image among the LLM's own candidates: the best by `choice_key` (no
    self-contradiction, the findings its prompt was given, report form; ties: the better
    beam); the top beam when not choosing. With `repair`, the sentences by which the chosen
    report still contradicts itself are dropped (`resolve_contradictions`, deciding by the
    findings it was given)."""
    if not by_findings or (given is None and style is None):
        chosen = [options[0] for options in candidates]
    else:
        labels_of = given if given is not None else [None] * len(candidates)
        chosen = [min(enumerate(options),
                      key=lambda io: (choice_key(io[1], labels, style), io[0]))[1]
                  for options, labels in zip(candidates, labels_of)]
    return repair_reports(chosen, given) if repair else chosen


def repair_reports(reports: Sequence[str], given: Sequence[dict] | None) -> list[str]:
    """Each report without the sentences by which it contradicts itself
    (`resolve_contradictions`, deciding by the findings its prompt was given, if any)."""
    present = [None] * len(reports) if given is None else \
        [{g for g, v in to_coarse(labels).items() if v} for labels in given]
    return [resolve_contradictions(report, groups) for report, groups in zip(reports, present)]


def generate_reports(model, llm, images: torch.Tensor, prompt: str, max_new_tokens: int,
                     num_beams: int = 1, batch_size: int = 16, findings: bool = False,
                     by_findings: bool = True, repair: bool = False,
                     **generate_kwargs) -> list[str]:
    """One report per image (greedy when num_beams == 1; with findings, the candidate that
    writes the given findings best)."""
    candidates, given = generate_candidates(model, llm, images, prompt, max_new_tokens,
                                            num_beams, batch_size, findings, **generate_kwargs)
    return choose_reports(candidates, given, by_findings, repair=repair)


@dataclass
class ReportModel:
    """A trained Stage 2 model ready to write reports."""

    model: torch.nn.Module
    llm: object
    cfg: C.Stage2Config
    style: object = None  # the training reports' ReportStyle, for candidate choice
    token_limit: int | None = None  # new tokens enough for the longest training report

    @property
    def device(self) -> torch.device:
        """Where the model was placed; images given to it are moved there."""
        return next(self.model.parameters()).device

    def generate(self, images: torch.Tensor, num_beams: int = 1, max_new_tokens: int | None = None,
                 **kwargs) -> list[str]:
        """Reports for a batch of images (B, 1, S, S)."""
        return choose_reports(*self.candidates(images, num_beams, max_new_tokens, **kwargs),
                              by_findings=self.cfg.choose_by_findings, style=self.style,
                              repair=self.cfg.resolve_contradictions)

    def candidates(self, images: torch.Tensor, num_beams: int = 1,
                   max_new_tokens: int | None = None, **kwargs
                   ) -> tuple[list[list[str]], list[dict] | None]:
        """Candidates per image (beams, best first; with beams and findings chosen among, also
        `choose_samples` sampled ones) and the findings given."""
        findings = uses_findings(self.cfg, self.model)
        if num_beams > 1 and findings and self.cfg.choose_by_findings:
            kwargs.setdefault("samples", self.cfg.choose_samples)
            kwargs.setdefault("seed", self.cfg.seed)
        kwargs.setdefault("repetition_penalty", self.cfg.repetition_penalty)
        kwargs.setdefault("no_repeat_ngram_size", self.cfg.no_repeat_ngram_size)
        kwargs.setdefault("constrain", self.cfg.constrain_findings)
        kwargs.setdefault("vocabulary", self.style.vocabulary if self.style is not None else ())
        limit = min(self.cfg.max_new_tokens, self.token_limit or self.cfg.max_new_tokens)
        return generate_candidates(self.model, self.llm, to_device(images, self.device),
                                   self.cfg.prompt, max_new_tokens or limit,
                                   num_beams, findings=findings, system=self.cfg.system_prompt,
                                   absent=self.cfg.prompt_absent, **kwargs)

    def predicted_findings(self, images: torch.Tensor) -> list[dict[str, int]] | None:
        """The findings the prompt is given for each image (None when the model writes from
        its visual tokens alone)."""
        if not uses_findings(self.cfg, self.model):
            return None
        self.model.eval()
        with torch.no_grad():
            return self.model.decode_findings(self.model.findings(to_device(images, self.device)))

    def grounding_gap(self, images: torch.Tensor, reports: Sequence[str]) -> tuple[float, float]:
        """(own-image caption loss, shifted-image loss minus own) over a split."""
        own, shifted = grounding_losses(self.model, self.llm, to_device(images, self.device),
                                        reports, self.cfg)
        return own, shifted - own
