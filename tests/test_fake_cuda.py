"""Every step of the pipeline on a fake CUDA device (`tests/fake_cuda.py`): the device decision
resolves to cuda:0 and every tensor there is a FakeTensor, so an op that mixes cuda:0 and the
CPU fails here as it would on a card, and every read of a device value (a host sync) is
counted."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from tests.fake_cuda import GPU, fake_cuda, stage1_trainer, stage2_trainer

# The losses for the log (one copy) and the fused finite-gradient check; with the head's
# findings in the prompt (teacher forcing 0), their decision logits too. A blocking upload
# from the host counts as well. Several ranks agree on a stop over gloo, on the host.
MAX_SYNCS_PER_STEP = 3


def _on_gpu(module: torch.nn.Module) -> bool:
    return all(t.device == GPU for t in [*module.parameters(), *module.buffers()])


def _zeros(tensors):
    return {k: torch.zeros(t.shape, dtype=t.dtype) for k, t in tensors.items()}


def _stage1(tmp_path, objective: str = "findings"):
    trainer = stage1_trainer(tmp_path, objective)
    assert trainer.world.device == GPU
    return trainer


def _stage2(tmp_path, **overrides):
    trainer = stage2_trainer(tmp_path, **overrides)
    cfg = trainer.cfg
    assert cfg.findings_weight == 3.0 and cfg.llm.adapter_rank > 0 and cfg.findings_first
    return trainer


def test_a_stage1_step_runs_on_the_gpu_within_the_sync_budget(tmp_path, monkeypatch):
    with fake_cuda(monkeypatch) as syncs:
        trainer = _stage1(tmp_path)
        assert _on_gpu(trainer.model) and trainer.probe_images.device == GPU
        batch = next(trainer.loaders.epoch(1))
        before = [p.detach().clone() for p in trainer.model.parameters()]
        mark = syncs.mark()
        trainer._step(batch, 1)
        step = syncs.since(mark)
    assert trainer.step == 1 and trainer.optimizer.state  # the optimizer stepped
    assert all(p.device == GPU for p in before)
    assert len(step) <= MAX_SYNCS_PER_STEP, step


def test_a_stage2_step_with_adapters_and_weighted_findings_runs_in_bf16_on_the_gpu(
        tmp_path, monkeypatch):
    with fake_cuda(monkeypatch) as syncs:
        trainer = _stage2(tmp_path)
        assert _on_gpu(trainer.model) and _on_gpu(trainer.llm.model) and trainer.adapters
        batch = next(trainer.loaders.epoch(1))
        mark = syncs.mark()
        trainer._step(batch, 1)
        step = syncs.since(mark)
    assert trainer.step == 1 and trainer.optimizer.state
    assert len(step) <= MAX_SYNCS_PER_STEP, step


def test_checks_validation_generation_and_checkpoints_run_on_the_gpu(tmp_path, monkeypatch):
    """The frozen-LLM checksum, the label-masking check, the grounding-gap pass, generation
    (as far as fake values let it: its stopping reads stand-in values) and a checkpoint saved
    device-free and loaded back onto the GPU."""
    from pipeline import checkpoint as ckpt
    from pipeline.train.split_pass import split_grounding_losses

    written = []

    def save_file(tensors, path, metadata=None):  # what a checkpoint holds: host tensors only
        written.append({k: t.device for k, t in tensors.items()})
        with unset_fake_temporarily():
            real_save(_zeros(tensors), path, metadata=metadata)

    real_save = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", save_file)
    with fake_cuda(monkeypatch):
        trainer = _stage2(tmp_path)
        stats = trainer.preflight()  # frozen LLM, optimizer scope, label masking
        assert stats["preflight_supervised_tokens"] > 0
        checksum = trainer.llm.checksum()
        assert len(checksum) == 64
        records = trainer.loaders.val_records
        own, shifted = split_grounding_losses(trainer.model, trainer.llm, records,
                                              trainer.loaders.image_size, trainer.cfg)
        reports = trainer.generate(records[:2])
        assert len(reports) == 2 and all(isinstance(r, str) for r in reports)
        _predict_one_image(trainer, tmp_path)
        path = trainer.save("final", 1.0)
        tensors, meta = ckpt.load_checkpoint(path)  # device-free: onto the CPU
        assert all(t.device == torch.device("cpu") for t in tensors.values())
        trainer._load_weights(tensors)  # into the model on the GPU
        assert _on_gpu(trainer.model) and _on_gpu(trainer.llm.model)
    assert written and all(d == torch.device("cpu") for d in written[0].values())
    assert meta["stage"] == "stage2"


def _predict_one_image(trainer, tmp_path) -> None:
    """The pyfunc `predict` path (what `mlflow models serve` calls) for one image file."""
    from PIL import Image

    from pipeline.evaluate.serving import ReportVLMPyfunc
    from pipeline.models.report_model import ReportModel

    film = tmp_path / "film.png"
    Image.new("L", (40, 40), 128).save(film)
    served = ReportVLMPyfunc()
    served.report_model = ReportModel(trainer.model, trainer.llm, trainer.cfg,
                                      token_limit=trainer.report_token_limit)
    (report,) = served.predict(None, {"image": [str(film)]})
    assert isinstance(report, str)


def test_steps_read_the_device_only_through_host_values(tmp_path, monkeypatch):
    """Every host sync of a training step comes from `pipeline.device.host_values`: the losses
    for the log (one read) and the fused gradient norm (one read)."""
    with fake_cuda(monkeypatch) as syncs:
        stage1, stage2 = _stage1(tmp_path, "vicreg"), _stage2(tmp_path)
        counts = []
        for trainer in (stage1, stage2, stage2):  # Stage 2's second step: no first-step checks
            mark = syncs.mark()
            trainer._step(next(trainer.loaders.epoch(1)), 1)
            step = syncs.since(mark)
            assert all(s.through("host_values") for s in step), step
            counts.append(len(step))
    assert counts == [2, 2, 2]


def test_weighted_loss_cross_entropy_no_longer_mixes_cuda_logits_and_cpu_labels(monkeypatch):
    """aten.nll_loss (cross_entropy) got logits on cuda:0 and targets on the CPU: labels and
    token weights are built on the host and now go to the logits' device first."""
    from pipeline.models import captioning

    with fake_cuda(monkeypatch) as syncs:
        layout = captioning.Layout(2, ((5, 6), (5,)), ((7, 8, 1), (9, 1)), 0, 0)
        labels = captioning.make_labels(layout)
        weights = captioning.token_weights(layout, [1, 1], 3.0)
        assert labels.device.type == "cpu" and weights.device.type == "cpu"
        total = captioning.total_weight(labels, weights)  # read on the host: no sync
        logits = torch.randn(2, layout.length, 11, device=GPU)
        plain, weighted, _ = captioning.weighted_caption_loss(logits, labels, weights, total)
        assert plain.device == GPU and weighted.device == GPU
    assert not syncs.events
    assert total == (3.0 + 1 + 1) + (3.0 + 1)  # each report's first token, then the rest


def test_the_finite_gradient_guard_reads_one_fused_norm_not_one_per_parameter(monkeypatch):
    """aten._local_scalar_dense once per trainable tensor (float(param.grad.norm())) became
    one read of the total norm of all of them."""
    from pipeline.guards import check_finite_grads

    with fake_cuda(monkeypatch) as syncs:
        params = [torch.nn.Parameter(torch.zeros(3, device=GPU)) for _ in range(10)]
        for p in params:
            p.grad = torch.ones(3, device=GPU)
        value, total = check_finite_grads([(f"p{i}", p) for i, p in enumerate(params)], 1)
        assert total.device == GPU
    assert len(syncs.events) == 1 and syncs.events[0].through("host_values")


def test_ddp_picks_nccl_on_cuda_and_every_collective_gets_tensors_its_backend_takes(
        monkeypatch):
    """One process per GPU: the group's backend sends CUDA tensors over NCCL and the few host
    values the ranks agree on (losses, guard flags) over gloo. Every collective the world
    issues gets tensors on the rank's GPU or on the host, and the model DDP wraps sits on the
    rank's GPU."""
    import torch.distributed as dist

    from pipeline.device import process_group_backend
    from pipeline.train import distributed as D

    calls, opened = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(opened))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: opened.append(backend))
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: calls.append(("all_reduce", t)))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append(("barrier", None)))
    wrapped = []
    monkeypatch.setattr(D, "DistributedDataParallel",
                        lambda module, device_ids=None, **kw: wrapped.append(
                            (module, device_ids)) or module)
    with fake_cuda(monkeypatch):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        world = D.join_world("auto")
        assert world.device == torch.device("cuda", 1) and world.size == 2
        module = torch.nn.Linear(2, 2).to(world.device)
        world.wrap(module)
        world.mean([(1.0, 2)])
        world.agree(None)
        world.barrier()
    assert opened == [process_group_backend(torch.device("cuda", 1), 2)] == ["cpu:gloo,cuda:nccl"]
    assert wrapped == [(module, [1])] and module.weight.device == torch.device("cuda", 1)
    routes = {"cpu": "gloo", "cuda": "nccl"}
    for name, tensor in calls:
        if tensor is not None:
            assert tensor.device.type in routes, name
            assert tensor.device.type == "cpu" or tensor.device == world.device, name


def test_a_stage2_step_that_prompts_with_the_heads_findings_stays_within_the_budget(
        tmp_path, monkeypatch):
    """Without teacher forcing the prompt holds the head's decoded findings: one more copy to
    the host (the decision logits, the prior taken off on the device), 3 in all."""
    with fake_cuda(monkeypatch) as syncs:
        trainer = _stage2(tmp_path, teacher_forcing=0.0)
        batch = next(trainer.loaders.epoch(1))
        mark = syncs.mark()
        trainer._step(batch, 1)
        step = syncs.since(mark)
    assert len(step) == MAX_SYNCS_PER_STEP, step
    assert sum(s.through("decision_logits") for s in step) == 1, step
