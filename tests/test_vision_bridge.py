"""VisionMamba encoder, Bridge, the visual-token guard and the VisionBridge assembly, tiny."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline import config as C
from pipeline.models.bridge import Bridge, VisualTokenError, check_visual_tokens
from pipeline.models.vision import VisionMamba
from pipeline.models.vision_bridge import VisionBridge


def tiny_encoder(**overrides) -> VisionMamba:
    sizes = dict(image_size=32, patch_size=8, in_chans=1, d_model=32, depth=1, d_state=4,
                 d_conv=4, expand=2, chunk_size=32)
    return VisionMamba(**{**sizes, **overrides})


def test_encoder_makes_one_token_per_patch():
    torch.manual_seed(0)
    encoder = tiny_encoder(depth=2)
    tokens = encoder(torch.randn(3, 1, 32, 32))
    assert tokens.shape == (3, 16, 32) and encoder.grid_size == (4, 4)
    assert torch.isfinite(tokens).all()


def test_encoder_blocks_see_both_directions():
    # Changing only the last patch moves the first token through the reversed-sequence mixer;
    # with that mixer silenced the stack is causal and the first token stays bit-identical.
    torch.manual_seed(0)
    encoder = tiny_encoder().eval()
    images = torch.randn(1, 1, 32, 32)
    changed = images.clone()
    changed[..., -8:, -8:] += 1.0

    def first_and_last_change():
        with torch.no_grad():
            delta = (encoder(changed) - encoder(images)).abs().amax(dim=-1)[0]  # (16,)
        return float(delta[0]), float(delta[-1])

    first, last = first_and_last_change()
    assert first > 0 and last > 1e-3
    with torch.no_grad():
        encoder.blocks[0].mixer_bwd.out_proj.weight.zero_()
    first, last = first_and_last_change()
    assert first == 0 and last > 1e-3


def test_rms_norm_variant_runs_and_unknown_norm_is_refused():
    assert tiny_encoder(norm="rms")(torch.randn(1, 1, 32, 32)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="norm"):
        tiny_encoder(norm="batch")


def test_encoder_refuses_sizes_it_was_not_built_for():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_encoder(image_size=30)
    with pytest.raises(ValueError, match="built for 32x32"):
        tiny_encoder()(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("kind,grid", [("pool", (4, 4)), ("pool", None), ("queries", (4, 4))])
def test_bridge_maps_tokens_to_the_requested_count_and_width(kind, grid):
    bridge = Bridge(in_dim=32, out_dim=48, num_tokens=4, kind=kind, grid_size=grid)
    out = bridge(torch.randn(2, 16, 32))
    assert out.shape == (2, 4, 48)
    # different inputs give different tokens (no output norm pins them)
    assert torch.isfinite(out).all() and out.std() > 0


def test_grid_pooling_averages_2d_neighbourhoods():
    bridge = Bridge(in_dim=1, out_dim=8, num_tokens=4, grid_size=(4, 4))
    grid = torch.arange(16.0).view(1, 16, 1)  # row-major 4x4 grid of token values
    assert bridge._pool(grid).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_bridge_refuses_more_tokens_than_allowed_naming_the_numbers():
    with pytest.raises(VisualTokenError, match="120 visual tokens.*max_visual_tokens=96"):
        Bridge(in_dim=32, out_dim=48, num_tokens=120, max_visual_tokens=96)
    with pytest.raises(VisualTokenError, match="20 visual tokens out of 16"):
        Bridge(in_dim=32, out_dim=48, num_tokens=20, grid_size=(4, 4))
    with pytest.raises(ValueError, match="kind"):
        Bridge(in_dim=32, out_dim=48, num_tokens=4, kind="mlp")


def test_check_visual_tokens_guard():
    tokens = torch.zeros(2, 49, 8)
    assert check_visual_tokens(tokens, expected=49, max_visual_tokens=96) == 49
    with pytest.raises(VisualTokenError, match="got 49 visual tokens.*emit 16"):
        check_visual_tokens(tokens, expected=16, max_visual_tokens=96)
    with pytest.raises(VisualTokenError, match="49 visual tokens exceed max_visual_tokens=32"):
        check_visual_tokens(tokens, expected=49, max_visual_tokens=32)
    with pytest.raises(VisualTokenError, match="shape"):
        check_visual_tokens(torch.zeros(49, 8), expected=49, max_visual_tokens=96)


@pytest.mark.parametrize("kind", ["pool", "queries"])
def test_vision_bridge_from_tiny_config_trains_end_to_end(kind):
    cfg = C.build(C.Stage1Config, "tiny", {"bridge.kind": kind})
    torch.manual_seed(0)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    images = torch.randn(2, 1, cfg.encoder.image_size, cfg.encoder.image_size)
    visual = model(images)
    assert visual.shape == (2, model.num_visual_tokens, model.out_dim) == (2, 4, 64)
    assert model.encode(images).shape == (2, 16, cfg.encoder.d_model)
    check_visual_tokens(visual, model.num_visual_tokens, cfg.bridge.max_visual_tokens)
    visual.square().mean().backward()
    # The finding head is off this path (images -> visual tokens); it trains through findings().
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in model.named_parameters() if not n.startswith("finding_head."))


@pytest.mark.parametrize("kind", ["pool", "queries"])
def test_checkpoint_readers_find_out_dim_in_the_last_projector_layer(kind):
    # pipeline.models.loading reads out_dim from "bridge.proj.2.weight" (the projector's last Linear).
    model = VisionBridge.from_config(C.EncoderConfig(**{"image_size": 32, "patch_size": 8,
                                                        "d_model": 32, "depth": 1, "d_state": 4}),
                                     C.BridgeConfig(num_visual_tokens=4, kind=kind), out_dim=40)
    state = model.state_dict()
    assert state["bridge.proj.2.weight"].shape[0] == 40


def test_from_config_refuses_too_many_visual_tokens():
    with pytest.raises(VisualTokenError, match="max_visual_tokens=8"):
        VisionBridge.from_config(C.EncoderConfig(), C.BridgeConfig(max_visual_tokens=8), 64)


@pytest.mark.parametrize("profile,tokens", [("demo", 16), ("default", 49)])
def test_profiles_build_with_their_sizes(profile, tokens):
    cfg = C.build(C.Stage1Config, profile)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    assert model.num_visual_tokens == tokens
    assert model.encoder.num_patches == cfg.encoder.num_patches


def test_finding_head_cells_see_where_a_finding_lies_and_grid_1_is_the_mean():
    from pipeline.models.findings import FindingHead

    torch.manual_seed(0)
    tokens = torch.randn(1, 16, 8)  # a 4 x 4 grid, row-major
    mirrored = tokens.reshape(1, 4, 4, 8).flip(2).reshape(1, 16, 8)  # left <-> right
    mean_head, cell_head = FindingHead(8, grid=1), FindingHead(8, grid=4)
    with torch.no_grad():
        assert torch.allclose(mean_head(tokens), mean_head(mirrored), atol=1e-6)
        assert not torch.allclose(cell_head(tokens), cell_head(mirrored), atol=1e-3)
        expected = mean_head.linear(mean_head.norm(tokens.mean(dim=1)))
        assert torch.equal(mean_head(tokens), expected)  # the head of checkpoints before cells
    with pytest.raises(ValueError, match="not a square grid"):
        cell_head(torch.randn(1, 15, 8))


def test_a_checkpoint_from_before_cells_loads_with_its_mean_head(tmp_path):
    # Its config names no grid (the default is now 4 cells); the weights say 1.
    import dataclasses
    import json

    from pipeline.checkpoint import save_checkpoint
    from pipeline.models.loading import load_vision_bridge

    cfg = C.build(C.Stage1Config, "tiny", {"bridge.finding_grid": 1})
    old = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim).eval()
    saved = dataclasses.asdict(cfg)
    del saved["bridge"]["finding_grid"]
    path = save_checkpoint(tmp_path / "old", old.state_dict(), {"config": json.dumps(saved)})
    model, _, loaded_cfg = load_vision_bridge(path, C.build(C.Stage1Config, "tiny"))
    assert loaded_cfg.bridge.finding_grid == 1 and C.BridgeConfig().finding_grid == 4
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.findings(images), old.findings(images))


def test_fine_decisions_take_the_training_weights_back_out():
    # Positive-weighted BCE inflates a rare label's probability by its weight. A group's
    # presence keeps that (recall), which of its members does not: the head's prior (log of
    # the weights) comes off the fine logits, so a film with one device is not given all three.
    from pipeline.models.findings import COARSE, FINE, FindingHead, decode_findings

    logits = torch.full((1, len(FINE) + len(COARSE)), -5.0)
    logits[0, len(FINE) + COARSE.index("devices")] = 2.0
    for name, value in (("devices_tube", 2.0), ("devices_line", 1.5), ("devices_pacemaker", 1.0)):
        logits[0, FINE.index(name)] = value
    logits[0, len(FINE) + COARSE.index("effusion")] = 3.0  # bilateral, clearly
    logits[0, FINE.index("effusion_left")], logits[0, FINE.index("effusion_right")] = 4.0, 3.5
    head = FindingHead(8)
    assert torch.equal(head.fine_prior, torch.zeros(len(FINE)))  # before: weighted as they are
    before = decode_findings(logits, fine_prior=head.fine_prior)[0]
    assert before["devices_tube"] == before["devices_line"] == before["devices_pacemaker"] == 1

    head.set_prior(torch.full((len(FINE) + len(COARSE),), 10.0))
    assert torch.allclose(head.fine_prior, torch.full((len(FINE),), math.log(10.0)))
    after = decode_findings(logits, fine_prior=head.fine_prior)[0]
    # devices stay present (the coarse logit is not shifted), as their likeliest kind only
    assert (after["devices_tube"], after["devices_line"], after["devices_pacemaker"]) == (1, 0, 0)
    assert after["effusion_left"] == after["effusion_right"] == 1  # odds over even at 4 and 3.5
    assert after["no_finding"] == 0

    # a label in every training report (weight 0) keeps a finite prior
    head.set_prior(torch.zeros(len(FINE) + len(COARSE)))
    assert torch.isfinite(head.fine_prior).all()


def test_the_head_prior_travels_with_its_weights_and_older_heads_load_without_one(tmp_path):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models.findings import FINE
    from pipeline.models.loading import PRIOR_KEY, load_vision_bridge

    cfg = C.build(C.Stage1Config, "tiny")
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim).eval()
    model.finding_head.set_prior(torch.linspace(2.0, 9.0, 40))
    path = save_checkpoint(tmp_path / "now", model.state_dict(), {})
    loaded, _, _ = load_vision_bridge(path, cfg)
    assert torch.equal(loaded.finding_head.fine_prior, model.finding_head.fine_prior)
    assert float(loaded.finding_head.fine_prior.abs().sum()) > 0

    old_tensors = {k: v for k, v in model.state_dict().items() if k != PRIOR_KEY}
    old, _, _ = load_vision_bridge(save_checkpoint(tmp_path / "old", old_tensors, {}), cfg)
    assert torch.equal(old.finding_head.fine_prior, torch.zeros(len(FINE)))
