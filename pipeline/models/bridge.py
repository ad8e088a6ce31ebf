"""Bridge: encoder tokens (B, N, in_dim) -> visual tokens (B, num_tokens, out_dim) for the LLM.

Two kinds, both ending in the same LLaVA-style projector (Linear-GELU-Linear, no output norm):
- `pool`: adaptive average pooling, over the 2-D patch grid when `grid_size` is given and
  num_tokens is a square (14x14 -> 7x7 keeps neighbourhoods together), else over the sequence.
- `queries`: num_tokens learned queries cross-attend to the tokens (a one-layer Q-Former).

The number of visual tokens is bounded (`max_visual_tokens`, they take LLM context): a bridge
that would exceed it is refused at construction, and `check_visual_tokens` is the guard at the
seam where visual tokens meet the LLM. Both raise `VisualTokenError` naming the numbers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("pool", "queries")


class VisualTokenError(ValueError):
    """A visual-token count that is wrong or above the allowed maximum."""


def check_visual_tokens(visual_tokens: Tensor, expected: int, max_visual_tokens: int) -> int:
    """The visual-token count; VisualTokenError unless it is `expected` and <= max_visual_tokens."""
    if visual_tokens.dim() != 3:
        raise VisualTokenError(f"visual tokens must be (batch, tokens, dim), got shape "
                               f"{tuple(visual_tokens.shape)}")
    count = int(visual_tokens.shape[1])
    if count > max_visual_tokens:
        raise VisualTokenError(f"{count} visual tokens exceed "
                               f"max_visual_tokens={max_visual_tokens}")
    if count != expected:
        raise VisualTokenError(f"got {count} visual tokens, the bridge should emit {expected}")
    return count


def _heads_for(dim: int) -> int:
    return next(h for h in (8, 4, 2, 1) if dim % h == 0)


class QueryAttention(nn.Module):
    """num_tokens learned queries attending over the encoder tokens (residual on the queries)."""

    def __init__(self, dim: int, num_tokens: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.q_norm = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, _heads_for(dim), batch_first=True)

    def forward(self, tokens: Tensor) -> Tensor:
        q = self.q_norm(self.queries).expand(tokens.shape[0], -1, -1)   # (B, num_tokens, dim)
        kv = self.kv_norm(tokens)
        out, _ = self.attn(q, kv, kv, need_weights=False)
        return out + self.queries


class Bridge(nn.Module):
    """(B, N, in_dim) encoder tokens -> (B, num_tokens, out_dim) visual tokens.

    The projector's hidden width is hidden_mult * in_dim.
    """

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, kind: str = "pool",
                 hidden_mult: int = 2, max_visual_tokens: int = 96,
                 grid_size: tuple[int, int] | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"bridge kind {kind!r}; choose one of {KINDS}")
        if num_tokens < 1:
            raise VisualTokenError(f"num_tokens must be >= 1, got {num_tokens}")
        if num_tokens > max_visual_tokens:
            raise VisualTokenError(f"bridge would emit {num_tokens} visual tokens, more than "
                                   f"max_visual_tokens={max_visual_tokens}")
        if kind == "pool" and grid_size is not None and num_tokens > grid_size[0] * grid_size[1]:
            raise VisualTokenError(f"pooling cannot make {num_tokens} visual tokens out of "
                                   f"{grid_size[0] * grid_size[1]} encoder tokens")
        self.kind, self.num_tokens, self.out_dim = kind, num_tokens, out_dim
        self.max_visual_tokens = max_visual_tokens
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        side = math.isqrt(num_tokens)
        self._pool_2d = (self.grid_size is not None and side * side == num_tokens
                         and side <= min(self.grid_size))
        self.cross_attn = QueryAttention(in_dim, num_tokens) if kind == "queries" else None
        hidden = hidden_mult * in_dim
        # LLaVA-style MLP projector, no output norm: a norm would pin the token scale, which
        # hides dead features from the loss and slows a collapse by orders of magnitude.
        # pipeline.models.loading reads out_dim from the last Linear ("bridge.proj.2.weight").
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def _pool(self, tokens: Tensor) -> Tensor:
        if self._pool_2d:
            rows, cols = self.grid_size
            if tokens.shape[1] != rows * cols:
                raise ValueError(f"{tokens.shape[1]} encoder tokens do not fill the "
                                 f"{rows}x{cols} grid")
            side = math.isqrt(self.num_tokens)
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, rows, cols)
            return F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
        if tokens.shape[1] < self.num_tokens:  # adaptive pooling would silently repeat tokens
            raise ValueError(f"cannot pool {tokens.shape[1]} encoder tokens into {self.num_tokens}")
        return F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.num_tokens).transpose(1, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, N, in_dim) -> (B, num_tokens, out_dim)."""
        x = self.cross_attn(tokens) if self.cross_attn is not None else self._pool(tokens)
        return self.proj(x)
