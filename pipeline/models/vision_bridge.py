"""VisionBridge: the trainable half of the report model, VisionMamba encoder + Bridge.

The one vision-side assembly that takes configs (`from_config`); the leaf modules take explicit
sizes. Images (B, C, H, W) -> visual tokens (B, num_visual_tokens, out_dim), where out_dim is
the LLM's hidden size in Stage 2 (or Stage 1's embed_dim).
"""
from __future__ import annotations

from torch import Tensor, nn

from pipeline.config import BridgeConfig, EncoderConfig
from pipeline.models.bridge import Bridge
from pipeline.models.findings import FindingHead, decode_findings
from pipeline.models.vision import VisionMamba


class VisionBridge(nn.Module):
    """Encoder + bridge: images (B, C, H, W) -> visual tokens (B, num_visual_tokens, out_dim)."""

    def __init__(self, encoder: VisionMamba, bridge: Bridge, finding_head: FindingHead | None = None):
        super().__init__()
        self.encoder = encoder
        self.bridge = bridge
        self.finding_head = finding_head

    @classmethod
    def from_config(cls, encoder_cfg: EncoderConfig, bridge_cfg: BridgeConfig,
                    out_dim: int) -> "VisionBridge":
        """Build from the encoder and bridge configs; out_dim is the width of the visual tokens."""
        encoder = VisionMamba(
            image_size=encoder_cfg.image_size, patch_size=encoder_cfg.patch_size,
            in_chans=encoder_cfg.in_chans, d_model=encoder_cfg.d_model, depth=encoder_cfg.depth,
            d_state=encoder_cfg.d_state, d_conv=encoder_cfg.d_conv, expand=encoder_cfg.expand,
            chunk_size=encoder_cfg.chunk_size)
        bridge = Bridge(
            in_dim=encoder_cfg.d_model, out_dim=out_dim, num_tokens=bridge_cfg.num_visual_tokens,
            kind=bridge_cfg.kind, hidden_mult=bridge_cfg.hidden_mult,
            max_visual_tokens=bridge_cfg.max_visual_tokens, grid_size=encoder.grid_size)
        head = FindingHead(encoder_cfg.d_model, bridge_cfg.finding_grid) \
            if bridge_cfg.finding_head else None
        return cls(encoder, bridge, head)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image."""
        return self.bridge.num_tokens

    @property
    def out_dim(self) -> int:
        """Width of each visual token."""
        return self.bridge.out_dim

    def encode(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> encoder tokens (B, N, d_model)."""
        return self.encoder(images)

    @property
    def has_findings(self) -> bool:
        """Whether the model classifies findings (classify-then-generate)."""
        return self.finding_head is not None

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> visual tokens (B, num_visual_tokens, out_dim)."""
        return self.bridge(self.encoder(images))

    def forward_with_findings(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """(visual tokens, finding logits (B, HEAD_OUTPUTS) or None) from one encoder pass."""
        tokens = self.encoder(images)
        logits = self.finding_head(tokens) if self.finding_head is not None else None
        return self.bridge(tokens), logits

    def findings(self, images: Tensor) -> Tensor:
        """Finding logits only (Stage 1's `findings` objective; the bridge is not run)."""
        return self._head()(self.encoder(images))

    def decode_findings(self, logits: Tensor) -> list[dict[str, int]]:
        """This head's logits -> labels per image (`findings.decode_findings`, with the head's
        `fine_prior`)."""
        return decode_findings(logits, fine_prior=self._head().fine_prior)

    def _head(self) -> FindingHead:
        if self.finding_head is None:
            raise ValueError("this vision-bridge has no finding head (bridge.finding_head=false)")
        return self.finding_head
