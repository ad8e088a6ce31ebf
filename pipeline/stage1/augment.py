"""Batch augmentations for two-view objectives, in plain torch (no torchvision needed).

Mild on purpose: radiographs are not natural photos (no flips: left/right is a finding).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def radiograph_views(images: torch.Tensor, generator: torch.Generator | None = None,
                     max_shift: float = 0.08, max_rotate_deg: float = 7.0,
                     scale_range: tuple[float, float] = (0.85, 1.0),
                     max_contrast: float = 0.2, noise_std: float = 0.03) -> torch.Tensor:
    """A random affine crop, contrast/brightness jitter and noise per image (B, C, H, W)."""
    B = images.shape[0]
    dev, dt = images.device, images.dtype
    draw_on = getattr(generator, "device", None)  # the generator's device: views are the same on any

    # Drawn where the generator is; the copy to the images' device does not wait for the GPU's
    # queue (a blocking copy from the host synchronises the stream first).
    def uniform(lo: float, hi: float) -> torch.Tensor:
        drawn = torch.rand(B, generator=generator, device=draw_on)
        return lo + (hi - lo) * drawn.to(dev, dt, non_blocking=True)

    angle = uniform(-max_rotate_deg, max_rotate_deg) * math.pi / 180
    scale = uniform(*scale_range)
    tx, ty = uniform(-max_shift, max_shift), uniform(-max_shift, max_shift)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, padding_mode="border", align_corners=False)
    contrast = uniform(1 - max_contrast, 1 + max_contrast).view(B, 1, 1, 1)
    brightness = uniform(-max_contrast / 2, max_contrast / 2).view(B, 1, 1, 1)
    noise = torch.randn(out.shape, generator=generator, device=draw_on).to(dev, dt,
                                                                             non_blocking=True)
    return out * contrast + brightness + noise_std * noise


def per_sample(augment):
    """`augment(images, generator)` applied image by image, each with its own generator.

    A sample's view then depends only on its generator, not on which images share its batch
    (a rank's share of a global batch gets the views the whole batch would).
    """
    def apply(images: torch.Tensor, generators) -> torch.Tensor:
        return torch.cat([augment(images[i:i + 1], g) for i, g in enumerate(generators)])
    return apply
