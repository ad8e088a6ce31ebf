"""Vision Mamba encoder (Vim-style): patches -> bidirectional Mamba blocks -> tokens (B, N, d).

Each block is pre-norm and runs two independent `Mamba` mixers, one over the patch sequence and
one over the reversed sequence (flipped back), sums them and adds the residual. Both directions
always run, on the kernel path and the portable path alike (Vim's slow path silently dropped the
backward scan).

Sizes (`EncoderConfig` profiles; 1-channel chest X-rays):
  tiny     32 px, patch 8,  d_model 32,  depth 1,  d_state 4   (16 tokens; tests, seconds on a CPU)
  demo     128 px, patch 16, d_model 96,  depth 2,  d_state 16  (64 tokens; `make demo`)
  default  224 px, patch 16, d_model 192, depth 4,  d_state 16  (196 tokens; ~2.1 M parameters)
  GPU      224 px, patch 16, d_model 384, depth 12, d_state 16  (Vim-S-like, ~23 M parameters:
           pass these through `EncoderConfig` overrides; meant for the mamba_ssm kernels)
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pipeline.models.mamba import Mamba

NORMS = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}


class PatchEmbed(nn.Module):
    """Non-overlapping patches (a conv with stride = kernel = patch_size) -> (B, N, d_model)."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, d_model: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of "
                             f"patch_size {patch_size}")
        self.image_size, self.patch_size = image_size, patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.proj = nn.Conv2d(in_chans, d_model, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the encoder was built for "
                             f"{self.image_size}x{self.image_size} (fixed position embedding)")
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, N, d_model), row-major patches


class BiMambaBlock(nn.Module):
    """x + Mamba_fwd(norm(x)) + flip(Mamba_bwd(flip(norm(x)))): one Vim block."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, chunk_size: int,
                 norm: str = "layer", layer_idx: int | None = None):
        super().__init__()
        self.norm = NORMS[norm](d_model)
        mixer = dict(d_state=d_state, d_conv=d_conv, expand=expand, chunk_size=chunk_size)
        self.mixer_fwd = Mamba(d_model, layer_idx=layer_idx, **mixer)
        self.mixer_bwd = Mamba(d_model, layer_idx=layer_idx, **mixer)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.mixer_fwd(h) + self.mixer_bwd(h.flip(1)).flip(1)


class VisionMamba(nn.Module):
    """Images (B, in_chans, H, W) -> tokens (B, N, d_model), N = (image_size / patch_size)^2."""

    def __init__(self, image_size: int, patch_size: int, in_chans: int, d_model: int, depth: int,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, chunk_size: int = 32,
                 norm: str = "layer"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm {norm!r}; choose one of {sorted(NORMS)}")
        self.d_model = d_model
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, d_model)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, d_model))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            BiMambaBlock(d_model, d_state, d_conv, expand, chunk_size, norm, layer_idx=i)
            for i in range(depth))
        self.norm_f = NORMS[norm](d_model)
        self._rescale_residual_projections(depth)

    def _rescale_residual_projections(self, depth: int) -> None:
        # GPT-2 / mamba_ssm MixerModel: 2 * depth mixers add into the residual stream, so their
        # output projections start 1/sqrt(2 * depth) smaller to keep its variance flat in depth.
        with torch.no_grad():
            for block in self.blocks:
                for mixer in (block.mixer_fwd, block.mixer_bwd):
                    mixer.out_proj.weight /= math.sqrt(2 * depth)

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid the tokens come from."""
        return self.patch_embed.grid_size

    @property
    def num_patches(self) -> int:
        """Number of tokens per image."""
        return self.grid_size[0] * self.grid_size[1]

    def forward(self, images: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, N, d_model)."""
        x = self.patch_embed(images) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm_f(x)
