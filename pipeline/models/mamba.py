"""Mamba-1 mixer: mamba_ssm's fused CUDA kernels when present, a chunked PyTorch scan otherwise.

`Mamba` has the constructor, parameters and state_dict of `mamba_ssm.Mamba` (mamba_simple), so
weights move between the two unchanged. `forward` has one dispatch point: on CUDA, mamba_ssm's
`selective_scan_fn` with causal_conv1d's `causal_conv1d_fn` (torch's conv1d where only mamba_ssm
is installed) when they import, else the portable path, which is the specification the kernels
are tested against. The first CUDA forward warns once which of the two runs.

The portable selective scan splits L into n_chunks chunks of T <= `chunk_size` positions and
keeps the state as (T, batch, n_chunks, N, D): step t of every chunk is one contiguous slab and D
is the vectorised axis. Three stages, each a short Python loop over slabs:
  1. inside every chunk, all chunks at once, the recurrence from a zero state (T steps);
  2. the state carried across chunks, each chunk decaying it by exp(A * sum(dt)) (n_chunks steps);
  3. each chunk's incoming state decayed through its positions and added (T steps).
Only exp(dt * A) <= 1 is ever taken, so dt from 1e-4 to 10 with A down to -16 stays exact.
A closed form inside chunks was measured and rejected. A differs per (d, n), so the pairwise
exp(S_t - S_s) of Mamba-2's SSD costs T times the memory traffic here (an autograd prototype
took 0.5 s against ~25 ms for fwd+bwd at L=196), and the factored exp(S_t) * cumsum(exp(-S_s))
overflows once a chunk's log-decay passes -88.
The backward pass is hand-written (`_ChunkedScan`): autograd through the in-place slab updates
allocates a full-size zero tensor per slice and was ~10x slower.
Shapes: b batch, L positions, D channels (d_inner), N state size (d_state).
"""
from __future__ import annotations

import functools
import logging
import math
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)
_LOGGED_PATHS: set[str] = set()
_PATHS = {"kernel": "mamba_ssm CUDA kernels", "portable": "pure PyTorch chunked scan"}
_INSTALL_HINT = ("pip install --no-build-isolation causal-conv1d==1.7.0 mamba-ssm==2.3.2.post1 "
                 "(the project's [cuda] extra)")


@functools.lru_cache(maxsize=1)
def _load_kernels() -> SimpleNamespace | None:
    """mamba_ssm's scan (and causal_conv1d's conv), imported on first CUDA use only; None where
    mamba_ssm does not import."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:  # the conv then runs as torch's conv1d (cuDNN)
        causal_conv1d_fn = None
    return SimpleNamespace(selective_scan_fn=selective_scan_fn, causal_conv1d_fn=causal_conv1d_fn)


def kernel_path_name(kernels: SimpleNamespace | None) -> str:
    """What the mixer runs on CUDA with `kernels` (as the warning and benchmarks say it)."""
    if kernels is None:
        return "portable PyTorch scan"
    conv = "causal_conv1d_fn" if kernels.causal_conv1d_fn is not None else "torch conv1d"
    return f"mamba_ssm selective_scan_fn + {conv}"


def _log_path_once(path: str) -> None:
    if path not in _LOGGED_PATHS:
        _LOGGED_PATHS.add(path)
        logger.info("Mamba mixer runs the %s path (%s)", path, _PATHS[path])


def _kernels_for(want_kernels: bool) -> SimpleNamespace | None:
    """The fused kernels if wanted (CUDA input and use_fast_path) and importable, else None.

    A wanted but missing kernel is never a silent change: it warns once, with the install hint.
    """
    if not want_kernels:
        return None
    kernels = _load_kernels()
    if "cuda-path" not in _LOGGED_PATHS:  # one warning per process, either way
        _LOGGED_PATHS.add("cuda-path")
        if kernels is None:
            warnings.warn("Mamba on CUDA without the mamba_ssm kernels: running the portable "
                          "PyTorch scan (same results, slower). To install them: "
                          f"{_INSTALL_HINT}", RuntimeWarning, stacklevel=3)
        else:
            warnings.warn(f"Mamba on CUDA runs the {kernel_path_name(kernels)} kernels",
                          RuntimeWarning, stacklevel=3)
    return kernels


# ---- portable selective scan ------------------------------------------------------------------
def _chunk_layout(L: int, chunk_size: int) -> tuple[int, int]:
    """(T, n_chunks) with T <= chunk_size and the least padding: L=196, 32 -> 7 chunks of 28."""
    n_chunks = math.ceil(L / max(1, chunk_size))
    return math.ceil(L / n_chunks), n_chunks


# exp() takes a ~40x slower path below log(FLT_MIN) = -87.3 (denormal results); a decay under
# exp(-80) = 2e-35 is zero for every purpose, so log-decays are clamped there.
_MIN_LOG_DECAY = -80.0


def _to_chunks(x: Tensor, T: int, n_chunks: int) -> Tensor:
    """(b, L, K) -> (T, b, n_chunks, K), zero-padded to T * n_chunks positions.

    Position-in-chunk major: step t of every chunk is one contiguous slab, which is what the
    chunk loops below touch. The pad has dt = 0, so padded steps neither decay nor feed the state.
    """
    b, L, K = x.shape
    x = F.pad(x, (0, 0, 0, T * n_chunks - L)) if T * n_chunks != L else x
    return x.view(b, n_chunks, T, K).permute(2, 0, 1, 3).contiguous()


def _from_chunks(x: Tensor, L: int) -> Tensor:
    """(T, b, n_chunks, K) -> (b, L, K), dropping the pad."""
    T, b, n_chunks, K = x.shape
    return x.permute(1, 2, 0, 3).reshape(b, n_chunks * T, K)[:, :L]


def _scan_chunks_forward(h: Tensor, decay: Tensor, chunk_decay: Tensor) -> None:
    """In place: h (T, b, nc, N, D) holds dt*B*x and leaves holding the states h_t."""
    T, nc = h.shape[0], h.shape[2]
    for t in range(1, T):  # 1. every chunk from a zero state, all chunks at once
        h[t].addcmul_(decay[t], h[t - 1])
    if nc == 1:
        return
    h0 = torch.zeros_like(h[0])  # (b, nc, N, D) state entering each chunk
    for c in range(1, nc):  # 2. carry across chunks
        torch.addcmul(h[T - 1, :, c - 1], chunk_decay[:, c - 1], h0[:, c - 1], out=h0[:, c])
    carried = h0[:, 1:]
    for t in range(T):  # 3. decay each incoming state through its chunk
        h[t, :, 1:] += carried.mul_(decay[t, :, 1:])


def _reverse_within_chunks(g: Tensor, decay: Tensor, chunk_decay: Tensor) -> Tensor:
    """Backward stages 1-2, in place on g (T, b, nc, N, D), which holds dL/dy_t * C_t.

    Leaves each chunk's own share of dL/dh_t in g and returns the adjoint that reaches each
    chunk's last state from the chunks after it, (b, nc, N, D); stage 3 is in the backward.
    """
    T, nc = g.shape[0], g.shape[2]
    for t in range(T - 2, -1, -1):  # h_{t+1} = decay_{t+1} h_t + ..., so the adjoint runs back
        g[t].addcmul_(decay[t + 1], g[t + 1])
    g_in = torch.zeros_like(g[0])
    for c in range(nc - 2, -1, -1):
        torch.mul(decay[0, :, c + 1], g[0, :, c + 1], out=g_in[:, c])
        g_in[:, c].addcmul_(chunk_decay[:, c + 1], g_in[:, c + 1])
    return g_in


class _ChunkedScan(torch.autograd.Function):
    """y_t = C_t . h_t, h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, with a hand-written backward."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, chunk_size):
        L, N = u.shape[1], A.shape[1]  # u, dt: (b, L, D); A: (D, N); B, C: (b, L, N)
        T, nc = _chunk_layout(L, chunk_size)
        u, dt, B, C = (_to_chunks(x, T, nc) for x in (u, dt, B, C))       # (T, b, nc, D|N)
        D, M = u.shape[-1], u.numel() // u.shape[-1]                        # M: padded positions
        At = A.t().contiguous()                                              # (N, D)
        decay = (dt.unsqueeze(3) * At).clamp_(min=_MIN_LOG_DECAY).exp_()  # (T, b, nc, N, D) <= 1
        h = torch.mul((dt * u).unsqueeze(3), B.unsqueeze(4))                # (T, b, nc, N, D)
        chunk_decay = (dt.sum(0).unsqueeze(2) * At).clamp_(min=_MIN_LOG_DECAY).exp_()  # (b,nc,N,D)
        _scan_chunks_forward(h, decay, chunk_decay)
        y = torch.bmm(C.view(M, 1, N), h.view(M, N, D)).view(T, -1, nc, D)
        ctx.save_for_backward(u, dt, At, B, C, decay, h, chunk_decay)
        ctx.L = L
        return _from_chunks(y, L)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        u, dt, At, B, C, decay, h, chunk_decay = ctx.saved_tensors
        T, b, nc, N, D = h.shape
        m = b * nc                                                           # positions per slab
        gy = _to_chunks(gy, T, nc)                                           # (T, b, nc, D)
        g = torch.mul(gy.unsqueeze(3), C.unsqueeze(4))                       # (T, b, nc, N, D)
        carried = _reverse_within_chunks(g, decay, chunk_decay)[:, :-1]     # (b, nc-1, N, D)
        gC = torch.bmm(gy.view(-1, 1, D), h.view(-1, N, D).transpose(1, 2)).view_as(C)
        dtu = dt * u                                                         # (T, b, nc, D)
        g_dtu, gdt, gB = torch.empty_like(u), torch.empty_like(u), torch.empty_like(B)
        gA = torch.zeros_like(At)                                            # (N, D)
        # h_{t-1} for t = 0 of every chunk: the previous chunk's last state (zero for chunk 0)
        h_before = torch.cat([torch.zeros_like(h[0, :, :1]), h[T - 1, :, :-1]], dim=1)
        w, scratch = torch.empty_like(h[0]), torch.empty_like(h[0])         # (b, nc, N, D)
        # Stage 3 and every consumer of dL/dh_t, one slab at a time while it is in cache
        # (~10% faster at L=784 than whole-tensor passes).
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                carried.mul_(decay[t + 1, :, :-1])
            g[t, :, :-1] += carried                                          # g[t] = dL/dh_t
            g_t = g[t].view(m, N, D)
            torch.bmm(B[t].view(m, 1, N), g_t, out=g_dtu[t].view(m, 1, D))  # d/d(dt u)
            # row-vector @ transposed matrix: ~2x faster in MKL than matrix @ column-vector
            torch.bmm(dtu[t].view(m, 1, D), g_t.transpose(1, 2), out=gB[t].view(m, 1, N))
            torch.mul(g[t], h[t - 1] if t else h_before, out=w).mul_(decay[t])  # dL/d(dt A)_t
            torch.sum(torch.mul(w, At, out=scratch), dim=2, out=gdt[t])
            gA += torch.mul(w, dt[t].unsqueeze(2), out=scratch).sum((0, 1))
        gdt.addcmul_(g_dtu, u)
        gu = g_dtu.mul_(dt)
        L = ctx.L
        return (_from_chunks(gu, L), _from_chunks(gdt, L), gA.t(), _from_chunks(gB, L),
                _from_chunks(gC, L), None)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 state for fp32/bf16/fp16 inputs, as mamba_ssm's kernels; fp64 stays fp64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ssm_scan(u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             chunk_size: int = 32) -> Tensor:
    """Selective scan, token-major: u, dt (b, L, D), A (D, N), B, C (b, L, N) -> y (b, L, D)."""
    compute = _compute_dtype(u)
    # Out of autocast: under it the forward's matmuls would run in bf16 while the hand-written
    # backward runs in the state's fp32 (autocast does not reach a Function's backward).
    with torch.autocast(u.device.type, enabled=False):
        y = _ChunkedScan.apply(u.to(compute), dt.to(compute), A.to(compute), B.to(compute),
                               C.to(compute), int(chunk_size))
    return y.to(u.dtype)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor | None = None, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   chunk_size: int = 32) -> Tensor:
    """Portable `selective_scan_fn`: u, delta (b, D, L), A (D, N), B, C (b, N, L) -> (b, D, L)."""
    compute = _compute_dtype(u)
    dt = delta.transpose(1, 2).to(compute)                                   # (b, L, D)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)
    if delta_softplus:
        dt = F.softplus(dt)
    x = u.transpose(1, 2).to(compute)                                        # (b, L, D)
    y = ssm_scan(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), chunk_size)
    if D is not None:
        y = y + x * D.to(compute)
    if z is not None:
        y = y * F.silu(z.transpose(1, 2).to(compute))
    return y.transpose(1, 2).to(u.dtype)


# ---- the mixer --------------------------------------------------------------------------------
class Mamba(nn.Module):
    """Mamba-1 mixer with mamba_ssm.Mamba's constructor, parameters and function.

    (b, L, d_model) -> (b, L, d_model). `use_fast_path=False` forces the portable path on CUDA.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, use_fast_path: bool = True,
                 chunk_size: int = 32, layer_idx: int | None = None, device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path, self.chunk_size, self.layer_idx = use_fast_path, chunk_size, layer_idx
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv,
                                groups=self.d_inner, padding=d_conv - 1, bias=conv_bias,
                                **factory)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        self._init_dt_proj(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
        # S4D-real init, kept in fp32 whatever the module dtype (as mamba_ssm)
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device)
        self.A_log = nn.Parameter(torch.log(A).repeat(self.d_inner, 1))      # (D, N)
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def _init_dt_proj(self, dt_init, dt_scale, dt_min, dt_max, dt_init_floor) -> None:
        std = self.dt_rank ** -0.5 * dt_scale  # preserves the variance of dt at init
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise NotImplementedError(f"dt_init={dt_init!r}; use 'random' or 'constant'")
        # bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max]
        log_dt = (torch.rand(self.d_inner, device=self.dt_proj.bias.device)
                  * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # model-wide inits that zero biases must skip this one

    def forward(self, hidden_states: Tensor) -> Tensor:
        """(b, L, d_model) -> (b, L, d_model); the one place that picks kernels or PyTorch."""
        kernels = _kernels_for(hidden_states.is_cuda and self.use_fast_path)
        if kernels is not None:
            _log_path_once("kernel")
            return self._kernel_forward(hidden_states, kernels)
        _log_path_once("portable")
        return self._portable_forward(hidden_states)

    def _portable_forward(self, hidden_states: Tensor) -> Tensor:
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)                  # (b, L, D) each
        x = F.silu(self._causal_conv(x))
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        compute = _compute_dtype(x)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight).to(compute)
                        + self.dt_proj.bias.to(compute))                     # (b, L, D)
        A = -torch.exp(self.A_log.to(compute))                               # (D, N)
        y = self.ssm(x, dt, A, B, C)                                         # (b, L, D)
        y = (y + x.to(compute) * self.D.to(compute)) * F.silu(z.to(compute))
        return self.out_proj(y.to(hidden_states.dtype))

    def _causal_conv(self, x: Tensor) -> Tensor:
        """Depthwise causal conv in token-major layout, as shifted multiply-adds (no transposes)."""
        K, L = self.d_conv, x.shape[1]
        w = self.conv1d.weight[:, 0, :]                                      # (D, K)
        xp = F.pad(x, (0, 0, K - 1, 0))                                      # (b, L + K - 1, D)
        out = xp[:, K - 1:] * w[:, K - 1]
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias
        for k in range(K - 1):
            out = out.addcmul(xp[:, k:k + L], w[:, k])
        return out

    def ssm(self, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        """The selective scan of the portable path (token-major; see `ssm_scan`)."""
        return ssm_scan(u, dt, A, B, C, self.chunk_size)

    def _kernel_forward(self, hidden_states: Tensor, kernels: SimpleNamespace) -> Tensor:
        """mamba_simple's unfused path. Under bf16 autocast the projections and the scan's
        u, dt, B, C, z run in bf16 while A, D and the dt bias stay fp32 (the scan keeps its
        state in fp32), as the kernels expect; the parameters are never cast in place."""
        batch, L, _ = hidden_states.shape
        # in_proj as W @ x^T gives the channel-major layout the kernels want without a transpose
        xz = (self.in_proj.weight @ hidden_states.reshape(batch * L, -1).t()).view(-1, batch, L)
        xz = xz.permute(1, 0, 2)                                             # (b, 2D, L)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        A = -torch.exp(self.A_log.float())                                   # (D, N)
        x, z = xz.chunk(2, dim=1)                                            # (b, D, L) each
        if kernels.causal_conv1d_fn is not None:
            x = kernels.causal_conv1d_fn(x, self.conv1d.weight[:, 0, :], self.conv1d.bias,
                                         activation="silu")
        else:
            x = F.silu(self.conv1d(x)[..., :L])                              # (b, D, L)
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(batch * L, -1))       # (b*L, rank + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (self.dt_proj.weight @ dt.t()).view(-1, batch, L).permute(1, 0, 2)
        B = B.view(batch, L, -1).transpose(1, 2).contiguous()                # (b, N, L)
        C = C.view(batch, L, -1).transpose(1, 2).contiguous()
        y = kernels.selective_scan_fn(x, dt, A, B, C, self.D.float(), z=z,
                                      delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return self.out_proj(y.transpose(1, 2))
