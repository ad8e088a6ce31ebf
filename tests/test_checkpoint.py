"""Checkpoint format: safetensors with metadata; legacy .pt read with weights_only."""
import pickle

import pytest
import torch

from pipeline.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint, sha256_file


def test_roundtrip_keeps_tensors_and_metadata(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    meta = {"stage": "stage1", "lr": 1e-4, "final_loss": None, "health": {"feature_std": 0.5}}
    path = save_checkpoint(tmp_path / "ck", tensors, meta)
    assert path.name == "ck.safetensors"
    loaded, got = load_checkpoint(path)
    assert torch.equal(loaded["a.weight"], tensors["a.weight"])
    assert got == meta
    assert read_metadata(path)["health"]["feature_std"] == 0.5
    assert len(sha256_file(path)) == 64


def test_legacy_pt_state_dict_is_read(tmp_path):
    sd = {"w": torch.ones(2)}
    torch.save({"model": sd}, tmp_path / "old.pt")
    tensors, meta = load_checkpoint(tmp_path / "old.pt")
    assert torch.equal(tensors["w"], sd["w"]) and meta["format"] == "legacy-pt"


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_legacy_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": Evil()}, handle)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        load_checkpoint(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_checkpoint(bad)
