"""The one device decision: what `--device` resolves to, and that every module, buffer and
batch reaches the device through it (a fake CUDA device that resolves to `meta`), while
checkpoints stay device-free and load onto the run's device."""
from __future__ import annotations

import logging

import pytest
import torch

from pipeline import config as C
from pipeline import device as D
from pipeline.train.distributed import World, join_world

META = torch.device("meta")


@pytest.fixture()
def fake_cuda(monkeypatch):
    """Two visible 'GPUs'; a resolved CUDA device is handed out as `meta` (shapes, no data)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(D, "_cuda", lambda index: META)


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("cpu")
    assert D.resolve_device(None) == torch.device("cpu")
    assert D.resolve_device("cpu", local_rank=3) == torch.device("cpu")
    with pytest.raises(D.DeviceError, match="CUDA is not available"):
        D.resolve_device("cuda")
    with pytest.raises(D.DeviceError, match="unknown device|unsupported device"):
        D.resolve_device("tpu:0")
    assert D.device_params(torch.device("cpu")) == {"device": "cpu", "device_name": "cpu"}


def test_cuda_ranks_take_their_local_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert D.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert D.resolve_device("cuda", local_rank=2) == torch.device("cuda", 0)  # ranks share GPUs
    assert D.resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert D.resolve_device("auto") == torch.device("cuda", 1)
    with pytest.raises(D.DeviceError, match="only 2 CUDA device"):
        D.resolve_device("cuda:2")


def test_backend_is_nccl_on_cuda_and_gloo_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert D.process_group_backend(torch.device("cpu"), 2) == "gloo"
    assert D.process_group_backend(torch.device("cuda", 0), 1) == "cpu:gloo,cuda:nccl"
    # NCCL refuses two ranks on one GPU
    assert D.process_group_backend(torch.device("cuda", 0), 2) == "gloo"


def test_cpu_runs_fp32_and_loads_in_the_main_process():
    cpu = torch.device("cpu")
    with D.autocast(cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert D.loader_options(cpu, None) == {"num_workers": 0, "pin_memory": False,
                                           "persistent_workers": False}
    assert D.loader_options(cpu, 2)["persistent_workers"]


def _on(device, tensors) -> list[str]:
    return [name for name, t in tensors if t.device != device]


def _record_autocast(monkeypatch, module) -> list:
    entered = []

    def autocast(device, **options):
        entered.append(device)
        return D.autocast(torch.device("cpu"))
    monkeypatch.setattr(module, "autocast", autocast)
    return entered


def test_stage1_modules_buffers_and_batches_go_through_the_device_decision(fake_cuda, tmp_path,
                                                                          monkeypatch):
    from pipeline.stage1 import trainer as stage1_trainer
    from pipeline.stage1.trainer import Stage1Trainer, build_stage1_inputs

    world = join_world("auto")
    assert world.device == META
    cfg = C.build(C.Stage1Config, "tiny", {"data.root": str(tmp_path / "data"),
                                           "data.num_workers": 0})
    inputs = build_stage1_inputs(cfg, world)
    assert not _on(META, inputs.model.named_parameters())
    assert not _on(META, inputs.model.named_buffers())
    assert inputs.probe_images.device == META
    trainer = Stage1Trainer(cfg, inputs.model, inputs.loaders, inputs.probe_images, tmp_path, "",
                            lambda m, s: None, lambda t: None, logging.getLogger("t"), world=world)
    seen = []

    class Seen(Exception):
        pass

    def record(images, reports, generators):
        seen.append(images.device)
        raise Seen

    trainer.step_model = record
    entered = _record_autocast(monkeypatch, stage1_trainer)
    with pytest.raises(Seen):
        trainer._step(next(inputs.loaders.epoch(1)), 1)
    assert seen == [META] and entered == [META]


def test_stage2_llm_model_and_batches_go_through_the_device_decision(fake_cuda, tmp_path,
                                                                      monkeypatch):
    from pipeline.models.tiny_lm import build_tiny_llm
    from pipeline.stage2 import trainer as stage2_trainer
    from pipeline.stage2.job import Stage2Job
    from pipeline.train.common import EpochLoaders
    from pipeline.data import load_dataset

    world = join_world("auto")
    cfg = C.build(C.Stage2Config, "tiny", {"data.root": str(tmp_path / "data")})
    job = Stage2Job(cfg, profile="tiny", init="scratch", llm=build_tiny_llm(), world=world,
                    echo=lambda m: None)
    _, llm, model, _ = job._build(None)
    for module in (llm, model):
        assert not _on(META, module.named_parameters())
        assert not _on(META, module.named_buffers())
    records = load_dataset(cfg.data)
    loaders = EpochLoaders(records["train"], records["val"], cfg.encoder.image_size, 2, 0, world)
    trainer = stage2_trainer.Stage2Trainer(cfg, model, llm, loaders, tmp_path, "",
                                           lambda m, s: None, lambda t: None,
                                           logging.getLogger("t"), world=world)
    seen = []

    class Seen(Exception):
        pass

    def record(model, llm, images, *args, **kwargs):
        seen.append(images.device)
        raise Seen

    monkeypatch.setattr(stage2_trainer, "caption_forward", record)
    entered = _record_autocast(monkeypatch, stage2_trainer)
    with pytest.raises(Seen):
        trainer._step(next(loaders.epoch(1)), 1)
    with pytest.raises(Seen):
        trainer.preflight()
    assert seen == [META, META] and entered == [META]


def test_served_and_evaluated_models_take_images_to_their_device(fake_cuda, monkeypatch):
    from pipeline.evaluate import serving
    from pipeline.models import report_model as rm
    from pipeline.models.vision_bridge import VisionBridge

    assert serving.serving_device() == META  # the GPU when one is visible
    monkeypatch.setenv(serving.DEVICE_ENV, "cpu")
    assert serving.serving_device() == torch.device("cpu")
    cfg = C.build(C.Stage2Config, "tiny")
    model = D.place(VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=64), META)
    report_model = rm.ReportModel(model, llm=None, cfg=cfg)
    seen = []
    monkeypatch.setattr(rm, "generate_candidates",
                        lambda model, llm, images, *a, **k: seen.append(images.device) or ([], None))
    monkeypatch.setattr(rm, "grounding_losses",
                        lambda model, llm, images, *a, **k: seen.append(images.device) or (0.0, 0.0))
    images = torch.zeros(2, 1, cfg.encoder.image_size, cfg.encoder.image_size)
    report_model.candidates(images)
    report_model.grounding_gap(images, ["a", "b"])
    assert seen == [META, META]


def test_checkpoints_are_device_free_and_load_onto_the_run_device(tmp_path, monkeypatch):
    from pipeline import checkpoint as ckpt
    from pipeline.models.loading import load_vision_bridge
    from pipeline.models.vision_bridge import VisionBridge

    cfg = C.build(C.Stage1Config, "tiny")
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, out_dim=cfg.embed_dim)
    path = ckpt.save_checkpoint(tmp_path / "vb", model.state_dict(),
                                {"stage": "stage1", "config": C.to_dict(cfg)})
    mapped = []
    real = ckpt.load_file
    monkeypatch.setattr(ckpt, "load_file", lambda p, device="cpu": mapped.append(device) or
                        real(p, device=device))
    device = D.resolve_device("auto")  # the CPU here: the map_location path all the same
    loaded, _, _ = load_vision_bridge(path, cfg, device)
    assert mapped == [str(device)]
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert b.device == device and torch.equal(a, b), name
    tensors, _ = ckpt.load_checkpoint(path, torch.device("cpu"))
    assert all(t.device == torch.device("cpu") for t in tensors.values())
    legacy = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), legacy)
    tensors, _ = ckpt.load_checkpoint(legacy, device)
    assert all(t.device == device for t in tensors.values())


def test_world_wraps_in_ddp_on_its_device_only_when_distributed():
    module = torch.nn.Linear(2, 2)
    assert World(device=torch.device("cpu")).wrap(module) is module


def test_leaving_the_world_frees_unreachable_ddp_modules_before_the_group_closes(monkeypatch):
    """A DistributedDataParallel module kept alive by a reference cycle (a trainer and its
    callbacks) would otherwise be freed at interpreter exit, after its process group closed,
    where gloo's threads abort the rank ("terminate called without an active exception")."""
    import gc
    import weakref

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.train.distributed import leave_world

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        class Trainer:  # a cycle: only the garbage collector frees it
            pass

        trainer = Trainer()
        trainer.step_model = DistributedDataParallel(torch.nn.Linear(2, 2))
        trainer.self = trainer
        alive = weakref.ref(trainer.step_model)
        del trainer
        closed_with = []
        destroy = dist.destroy_process_group
        monkeypatch.setattr(dist, "destroy_process_group",
                            lambda *a: (closed_with.append(alive()), destroy(*a)))
        gc.disable()  # as when the collector has not run since the cycle was dropped
        try:
            leave_world(World(rank=0, size=2))
        finally:
            gc.enable()
        assert closed_with == [None]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_cpu_bf16_is_asked_for_and_needs_a_cpu_that_multiplies_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(D, "cpu_bf16", lambda: True)
    with D.autocast(cpu, cpu=True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with D.autocast(cpu):  # not asked: fp32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert (D.train_precision(cpu, True), D.train_precision(cpu, False)) == ("bf16", "fp32")
    monkeypatch.setattr(D, "cpu_bf16", lambda: False)  # emulated bf16 would be no faster
    with D.autocast(cpu, cpu=True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert D.train_precision(cpu, True) == "fp32"


def test_cpu_bf16_computes_the_grounding_losses_in_bf16_only_when_asked(monkeypatch):
    from pipeline import config as C
    from pipeline.models.report_model import grounding_losses
    from pipeline.models.tiny_lm import build_tiny_llm
    from pipeline.models.vision_bridge import VisionBridge

    llm = build_tiny_llm()
    cfg = C.build(C.Stage2Config, "tiny")
    torch.manual_seed(0)
    model = VisionBridge.from_config(cfg.encoder, cfg.bridge, llm.hidden_size)
    images = torch.randn(3, 1, cfg.encoder.image_size, cfg.encoder.image_size)
    reports = ["Right pneumothorax.", "The lungs are clear.", "Cardiomegaly."]
    monkeypatch.setattr(D, "cpu_bf16", lambda: True)
    fp32 = grounding_losses(model, llm, images, reports, cfg)
    bf16 = grounding_losses(model, llm, images, reports, C.build(C.Stage2Config, "tiny",
                                                                  {"cpu_bf16": True}))
    assert fp32 != bf16 and fp32 == pytest.approx(bf16, rel=5e-2)
    monkeypatch.setattr(D, "cpu_bf16", lambda: False)  # a CPU without bf16: fp32
    assert grounding_losses(model, llm, images, reports, C.build(
        C.Stage2Config, "tiny", {"cpu_bf16": True})) == fp32
