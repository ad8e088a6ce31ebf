"""Stage 1 objectives on visual tokens (B, T, D).

- `l2_proxy`: the old proxy `visual_tokens.pow(2).mean()`, kept to reproduce old runs. Its
  minimum is all-zero features, so it collapses by construction.
- `findings` (default): binary cross-entropy of the finding head against the findings the
  labeler reads from each training report (28 fine labels + 11 coarse groups, positive
  weights from the training split), on an augmented view. It cannot collapse: its targets
  differ across images, and a constant output pays the label entropy.
- `vicreg`: VICReg (Bardes et al. 2022) between two augmented views. The variance
  hinge keeps every dimension's std near `std_target`, so the all-constant solution costs
  `var_weight * std_target` and cannot be a minimum. Variance and covariance are computed over
  batch *and* tokens (B*T samples, so it works at batch size 2). Token-level variance alone
  can be met by position alone (every image mapped to the same positional pattern; measured:
  pooled features collapse, normalized_std ~0.06), so a second variance hinge acts on the
  per-image pooled features across the batch: different images must map to different points.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.models.findings import finding_loss

OBJECTIVES = ("findings", "vicreg", "l2_proxy")


def l2_proxy(visual_tokens: torch.Tensor) -> torch.Tensor:
    """The old collapsing proxy, exactly as it was."""
    return visual_tokens.pow(2).mean()


def _variance_term(x: torch.Tensor, std_target: float, eps: float = 1e-4) -> torch.Tensor:
    std = torch.sqrt(x.var(dim=0) + eps)
    return F.relu(std_target - std).mean()


def _covariance_term(x: torch.Tensor) -> torch.Tensor:
    n, d = x.shape
    x = x - x.mean(dim=0)
    cov = (x.T @ x) / max(n - 1, 1)  # (D, D)
    off_diag = cov - torch.diag(torch.diagonal(cov))
    return off_diag.pow(2).sum() / d


def vicreg(view_a: torch.Tensor, view_b: torch.Tensor, inv_weight: float = 25.0,
           var_weight: float = 25.0, cov_weight: float = 1.0,
           std_target: float = 1.0) -> dict[str, torch.Tensor]:
    """VICReg loss and its three terms for two views' visual tokens (B, T, D)."""
    a = view_a.reshape(-1, view_a.shape[-1])  # (B*T, D)
    b = view_b.reshape(-1, view_b.shape[-1])
    invariance = F.mse_loss(a, b)
    variance = 0.5 * (_variance_term(a, std_target) + _variance_term(b, std_target))
    covariance = _covariance_term(a) + _covariance_term(b)
    image_variance = torch.zeros((), device=a.device)
    if view_a.shape[0] >= 2:
        pooled_a, pooled_b = view_a.mean(dim=1), view_b.mean(dim=1)  # (B, D)
        image_variance = 0.5 * (_variance_term(pooled_a, std_target)
                                + _variance_term(pooled_b, std_target))
    loss = (inv_weight * invariance + var_weight * (variance + image_variance)
            + cov_weight * covariance)
    return {"loss": loss, "invariance": invariance, "variance": variance,
            "image_variance": image_variance, "covariance": covariance}


def objective_loss(name: str, model, images: torch.Tensor, augment=None,
                   generator: torch.Generator | None = None, reports=None,
                   pos_weight: torch.Tensor | None = None, uncertain: str = "positive"
                   ) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """(loss, extra terms, visual tokens of the first view or None) for objective `name`;
    `uncertain` is the findings objective's policy for uncertain mentions."""
    if name == "findings":
        if reports is None:
            raise ValueError("the findings objective needs the batch's reports")
        view = augment(images, generator) if augment is not None else images
        return finding_loss(model.findings(view), reports, pos_weight, uncertain), {}, None
    if name == "l2_proxy":
        tokens = model(images)
        return l2_proxy(tokens), {}, tokens
    if name == "vicreg":
        if augment is None:
            raise ValueError("vicreg needs an augmentation function")
        tokens_a = model(augment(images, generator))
        tokens_b = model(augment(images, generator))
        terms = vicreg(tokens_a, tokens_b)
        loss = terms.pop("loss")
        return loss, {k: v.detach() for k, v in terms.items()}, tokens_a
    raise ValueError(f"unknown objective {name!r}; choose one of {OBJECTIVES}")
