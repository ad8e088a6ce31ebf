"""The Mamba mixer: portable chunked scan vs the paper's sequential recurrence, parameters,
dispatch, and (on a GPU with mamba_ssm) the fused kernels vs the portable path."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import mamba as mamba_mod
from pipeline.models.mamba import Mamba, selective_scan, ssm_scan

RTOL = 1e-5  # max|ours - ref| / max|ref|, fp32 ours vs fp64 reference


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The Mamba paper's recurrence, one position at a time (selective_scan_fn shapes).

    u, delta: (b, D, L); A: (D, N); B, C: (b, N, L). h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,
    y_t = C_t h_t + D u_t, then gated by silu(z).
    """
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    dt = F.softplus(dt) if delta_softplus else dt
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])                     # (b, D, N)
    ys = []
    for t in range(u.shape[2]):
        dt_t = dt[:, :, t, None]                                             # (b, D, 1)
        h = torch.exp(dt_t * A) * h + dt_t * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))                            # (b, D)
    y = torch.stack(ys, dim=-1)                                              # (b, D, L)
    if D is not None:
        y = y + D[:, None] * u
    return y if z is None else y * F.silu(z)


def scan_inputs(b=2, d=6, n=4, L=37, dt_range=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    delta = r(b, d, L) * 0.5 - 1.0
    if dt_range is not None:  # raw delta such that softplus(delta + bias) spans dt_range
        lo, hi = dt_range
        pick = torch.rand(b, d, L, generator=gen) < 0.5
        delta = torch.where(pick, torch.full_like(delta, lo), torch.full_like(delta, hi))
        delta = torch.log(torch.expm1(delta)) * (1 + 0.01 * r(b, d, L))
    A = -torch.arange(1, n + 1.0).repeat(d, 1) * (0.5 + torch.rand(d, n, generator=gen))
    return {"u": r(b, d, L), "delta": delta, "A": A.clamp(min=-16), "B": r(b, n, L),
            "C": r(b, n, L), "D": r(d), "z": r(b, d, L), "delta_bias": 0.1 * r(d)}


def rel_err(got, ref):
    """max|got - ref| / max|ref| (absolute where ref is all zeros, e.g. dA at L=1)."""
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def outputs_and_grads(fn, inputs, grad_out, dtype):
    leaves = {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}
    y = fn(**leaves, delta_softplus=True)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_out.to(dtype))
    return {"y": y, **{f"d{k}": g for k, g in zip(leaves, grads)}}


@pytest.mark.parametrize("case", [
    dict(L=37),
    dict(L=1),
    dict(L=1000, d=4, n=3, chunk_size=32),          # 1000 = 31 chunks of 32 + 8: padding
    dict(L=64, chunk_size=16),                       # exact multiple
    dict(L=150, dt_range=(1e-4, 10.0)),              # extreme dt: decay exp(-160) and exp(-1e-4)
    dict(L=50, chunk_size=1),                        # one position per chunk: all carry
], ids=["L37", "L1", "L1000", "L64-exact", "extreme-dt", "chunk1"])
def test_portable_scan_matches_the_sequential_recurrence(case):
    chunk_size = case.pop("chunk_size", 32)
    inputs = scan_inputs(**case)
    grad_out = torch.randn_like(inputs["u"])
    ours = outputs_and_grads(lambda **kw: selective_scan(**kw, chunk_size=chunk_size), inputs,
                             grad_out, torch.float32)
    ref = outputs_and_grads(naive_selective_scan, inputs, grad_out, torch.float64)
    assert ours["y"].dtype == torch.float32
    for name in ref:
        assert torch.isfinite(ours[name]).all(), name
        assert rel_err(ours[name], ref[name]) < RTOL, (name, rel_err(ours[name], ref[name]))


def test_hand_written_backward_passes_gradcheck():
    gen = torch.Generator().manual_seed(1)
    b, L, d, n = 2, 11, 3, 2
    args = [torch.randn(b, L, d, generator=gen), torch.rand(b, L, d, generator=gen) + 0.05,
            -torch.rand(d, n, generator=gen) * 3, torch.randn(b, L, n, generator=gen),
            torch.randn(b, L, n, generator=gen)]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: ssm_scan(*a, chunk_size=4), args)


def test_retained_graph_gives_the_same_gradients_twice():
    # The backward reuses scratch buffers; the saved states themselves must stay intact.
    x = {k: v.requires_grad_() for k, v in scan_inputs(L=20).items()}
    y = selective_scan(**x, delta_softplus=True)
    first = torch.autograd.grad(y.sum(), list(x.values()), retain_graph=True)
    second = torch.autograd.grad(y.sum(), list(x.values()))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_no_grad_forward_equals_grad_forward():
    inputs = scan_inputs(L=70)
    with torch.no_grad():
        quiet = selective_scan(**inputs, delta_softplus=True)
    assert torch.equal(quiet, selective_scan(**inputs, delta_softplus=True))


def test_low_precision_inputs_keep_their_dtype_and_fp32_state():
    inputs = scan_inputs(L=40)
    y16 = selective_scan(**{k: v.bfloat16() for k, v in inputs.items()}, delta_softplus=True)
    y32 = selective_scan(**inputs, delta_softplus=True)
    assert y16.dtype == torch.bfloat16 and rel_err(y16, y32) < 3e-2


def test_scan_under_bf16_autocast_runs_its_forward_and_backward_in_fp32():
    # Autocast does not reach the hand-written backward: a bf16 forward under it failed
    # there with "expected scalar type Float but found BFloat16".
    inputs = {k: v.detach().requires_grad_() for k, v in scan_inputs(L=40).items()}
    plain = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ssm_scan(inputs["u"].transpose(1, 2), F.softplus(inputs["delta"]).transpose(1, 2), inputs["A"],
                     inputs["B"].transpose(1, 2), inputs["C"].transpose(1, 2))
    y.sum().backward()
    ref = ssm_scan(plain["u"].transpose(1, 2), F.softplus(plain["delta"]).transpose(1, 2), plain["A"],
                   plain["B"].transpose(1, 2), plain["C"].transpose(1, 2))
    ref.sum().backward()
    assert y.dtype == torch.float32 and torch.equal(y, ref)
    assert all(torch.equal(inputs[k].grad, plain[k].grad) for k in ("u", "delta", "A", "B", "C"))


class NaiveScanMamba(Mamba):
    """The mixer with the chunked scan swapped for the paper's recurrence."""

    def ssm(self, u, dt, A, B, C):
        y = naive_selective_scan(u.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2),
                                 C.transpose(1, 2))
        return y.transpose(1, 2)


def test_mixer_matches_the_mixer_with_the_naive_scan():
    torch.manual_seed(0)
    ours = Mamba(16, d_state=4, chunk_size=8)
    naive = NaiveScanMamba(16, d_state=4)
    naive.load_state_dict(ours.state_dict())
    x = torch.randn(2, 45, 16)
    grad = torch.randn(2, 45, 16)
    y_ours, y_naive = ours(x), naive(x)
    assert rel_err(y_ours, y_naive) < RTOL
    y_ours.backward(grad)
    y_naive.backward(grad)
    for (name, p), q in zip(ours.named_parameters(), naive.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, name  # fp32 on both sides


def test_mixer_matches_transformers_mamba_mixer_with_the_same_weights():
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    torch.manual_seed(0)
    ours = Mamba(32, d_state=8, chunk_size=8)
    theirs = MambaMixer(MambaConfig(hidden_size=32, state_size=8, conv_kernel=4, expand=2,
                                    use_mambapy=False), layer_idx=0)
    theirs.load_state_dict(ours.state_dict())  # same names, strict
    x = torch.randn(2, 30, 32)
    assert rel_err(ours(x), theirs(x)) < 1e-5


# Keys and shapes of mamba_ssm.Mamba(d_model=192, d_state=16, d_conv=4, expand=2), written out.
MAMBA_SSM_192 = {
    "A_log": (384, 16), "D": (384,), "conv1d.bias": (384,), "conv1d.weight": (384, 1, 4),
    "dt_proj.bias": (384,), "dt_proj.weight": (384, 12), "in_proj.weight": (768, 192),
    "out_proj.weight": (192, 384), "x_proj.weight": (44, 384),
}


def test_state_dict_has_mamba_ssm_names_shapes_and_init():
    m = Mamba(d_model=192, d_state=16, d_conv=4, expand=2)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA_SSM_192
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).repeat(384, 1))
    assert torch.equal(m.D, torch.ones(384))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.dt_proj.weight.abs().max() <= 12 ** -0.5


def test_dispatch_logs_the_portable_path_once(caplog, monkeypatch):
    monkeypatch.setattr(mamba_mod, "_LOGGED_PATHS", set())
    caplog.set_level(logging.INFO, logger="pipeline.models.mamba")
    m = Mamba(16, d_state=4)
    m(torch.randn(1, 5, 16))
    m(torch.randn(1, 5, 16))
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.models.mamba"]
    assert lines == ["Mamba mixer runs the portable path (pure PyTorch chunked scan)"]


def test_cpu_input_takes_the_portable_path_even_with_kernels(monkeypatch):
    monkeypatch.setattr(mamba_mod, "_load_kernels", lambda: pytest.fail("kernels are CUDA-only"))
    assert mamba_mod._kernels_for(want_kernels=False) is None
    # Through the one dispatch point, Mamba.forward, with kernels "installed": a CPU input must
    # never reach the kernel path, and the result is the portable path's.
    from types import SimpleNamespace

    monkeypatch.setattr(mamba_mod, "_load_kernels", lambda: SimpleNamespace())
    monkeypatch.setattr(Mamba, "_kernel_forward",
                        lambda self, x, kernels: pytest.fail("CPU input took the kernel path"))
    torch.manual_seed(0)
    m = Mamba(16, d_state=4)
    assert m.use_fast_path  # the kernels would be wanted on CUDA
    x = torch.randn(2, 7, 16)
    assert mamba_mod._kernels_for(x.is_cuda and m.use_fast_path) is None
    with torch.no_grad():
        assert torch.equal(m(x), m._portable_forward(x))


def test_missing_kernels_on_cuda_warn_once_and_fall_back(monkeypatch):
    monkeypatch.setattr(mamba_mod, "_LOGGED_PATHS", set())
    monkeypatch.setattr(mamba_mod, "_load_kernels", lambda: None)
    with pytest.warns(RuntimeWarning, match="mamba_ssm kernels.*pip install"):
        assert mamba_mod._kernels_for(want_kernels=True) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mamba_mod._kernels_for(want_kernels=True) is None


def test_kernels_on_cuda_warn_once_which_kernels_run(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(mamba_mod, "_LOGGED_PATHS", set())
    kernels = SimpleNamespace(selective_scan_fn=selective_scan, causal_conv1d_fn=_reference_conv)
    monkeypatch.setattr(mamba_mod, "_load_kernels", lambda: kernels)
    with pytest.warns(RuntimeWarning, match="selective_scan_fn \\+ causal_conv1d_fn"):
        assert mamba_mod._kernels_for(want_kernels=True) is kernels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mamba_mod._kernels_for(want_kernels=True) is kernels


def _reference_conv(x, weight, bias=None, activation=None):
    """causal_conv1d_fn's contract in plain torch: (b, D, L), weight (D, K) -> (b, D, L)."""
    D, K = weight.shape
    out = F.conv1d(x, weight[:, None, :], bias, padding=K - 1, groups=D)[..., :x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


@pytest.mark.parametrize("with_conv_kernel", [True, False])
def test_kernel_path_layout_matches_portable_path_on_cpu(with_conv_kernel):
    """The kernel path's plumbing (channel-major layout, conv, projections, the scan's
    arguments) with the kernels' contracts played by their portable equivalents: the same
    weights give the same function, values and gradients, as the portable path."""
    from types import SimpleNamespace

    kernels = SimpleNamespace(selective_scan_fn=selective_scan,
                              causal_conv1d_fn=_reference_conv if with_conv_kernel else None)
    torch.manual_seed(0)
    m = Mamba(24, d_state=4, bias=True)
    x = torch.randn(2, 29, 24)
    grad = torch.randn(2, 29, 24)
    results = []
    for forward in (lambda h: m._kernel_forward(h, kernels), m._portable_forward):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        forward(xi).backward(grad)
        results.append([forward(x).detach(), xi.grad] + [p.grad for p in m.parameters()])
    for kernel, portable in zip(*results):
        assert rel_err(kernel, portable) < 1e-5


# Relative error, kernel path vs portable path, on output and every gradient. fp32: the two
# scans sum in different orders; bf16 autocast (what training runs on CUDA): activations round
# to 8 mantissa bits in both paths, at different points.
KERNEL_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 5e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("L", [196, 784])
@pytest.mark.parametrize("autocast_dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_matches_portable_path_on_cuda(L, autocast_dtype, caplog, monkeypatch):
    pytest.importorskip("mamba_ssm")
    if mamba_mod._load_kernels() is None:
        pytest.skip("mamba_ssm kernels do not import")
    monkeypatch.setattr(mamba_mod, "_LOGGED_PATHS", set())
    caplog.set_level(logging.INFO, logger="pipeline.models.mamba")
    torch.manual_seed(0)
    m = Mamba(192, device="cuda")  # fp32 master weights, as training keeps them
    x = torch.randn(2, L, 192, device="cuda")
    grad = torch.randn_like(x)
    results = {}
    for fast in (True, False):
        m.use_fast_path = fast
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16,
                            enabled=autocast_dtype == torch.bfloat16):
            y = m(xi)
        y.float().backward(grad)
        results[fast] = [y, xi.grad] + [p.grad for p in m.parameters()]
    for kernel, portable in zip(results[True], results[False]):
        assert rel_err(kernel, portable) < KERNEL_TOLERANCE[autocast_dtype]
    assert "kernel path" in caplog.text and "portable path" in caplog.text


@pytest.mark.gpu
def test_state_dict_moves_to_and_from_mamba_ssm():
    mamba_ssm = pytest.importorskip("mamba_ssm")
    theirs = mamba_ssm.Mamba(d_model=192, d_state=16, d_conv=4, expand=2).cuda()
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == MAMBA_SSM_192
    ours = Mamba(192, use_fast_path=False).cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 64, 192, device="cuda")
    assert rel_err(ours(x), theirs(x)) < 2e-3
