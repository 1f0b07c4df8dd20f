"""Selective scan with a scalar decay per head: the "SSD" form of Mamba-2 (Dao & Gu, 2024,
"Transformers are SSMs", Sec. 6), in plain PyTorch.

For each head h, with state h_t [P, N] (Mamba-2 eq. 1 with A_t = a_t * I):

    h_t = a_t h_{t-1} + dt_t x_t B_t^T,    a_t = exp(dt_t A_h),  A_h < 0
    y_t = h_t C_t

Within a chunk of T tokens this is one masked matmul, y = (L o C B^T) (dt x), with the decay matrix
L[t, s] = a_{s+1} ... a_t = exp(cs_t - cs_s) for s <= t, where cs is the cumulative sum of the log
decays (Mamba-2 Sec. 6, the "1-semiseparable" mask). Across chunks a state of size [P, N] per head
is carried by a short recurrence, one step per chunk. Work is O(L T (N + P)) per head, in matmuls.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

try:  # fused Triton kernels from the Mamba authors (CUDA only); same numerics as ssd_scan
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor,
             chunk: int = 64) -> torch.Tensor:
    """x [B, L, H, P], dt [B, L, H] (> 0), A [H] (< 0), Bm and Cm [B, L, G, N] with G dividing H
    (head h reads group h // (H / G), as in mamba_ssm) -> y [B, L, H, P] in x's dtype.

    Decays and states are computed in float32 at least (autocast off): a cumulative sum of log
    decays in bf16 loses the decay of all but the first few tokens."""
    if mamba_chunk_scan_combined is not None and x.is_cuda:
        return mamba_chunk_scan_combined(x, dt, A, Bm, Cm, chunk_size=chunk)
    out_dtype = x.dtype
    dtype = torch.promote_types(x.dtype, torch.float32)
    # the meta device (shape-only passes: FLOP counts, `dtrain plan`) has no autocast to turn off
    with torch.autocast(x.device.type, enabled=False) if x.device.type != "meta" else contextlib.nullcontext():
        x, dt, A, Bm, Cm = (v.to(dtype) for v in (x, dt, A, Bm, Cm))
        b, L, H, P = x.shape
        G, N = Bm.shape[2:]
        pad = -L % chunk  # zero-padding the end: dt = 0 there, so it neither decays nor adds
        c, T = (L + pad) // chunk, chunk

        # Chunked, heads split as (group, head in group): [B, G, R, c, T, ...]
        xs = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad))  # dt_t x_t, [B, L', H, P]
        xs = xs.view(b, c, T, G, H // G, P).permute(0, 3, 4, 1, 2, 5)  # [B, G, R, c, T, P]
        la = F.pad(dt * A, (0, 0, 0, pad))  # log a_t, [B, L', H]
        cs = la.view(b, c, T, G, H // G).permute(0, 3, 4, 1, 2).cumsum(-1)  # [B, G, R, c, T]
        Bc, Cc = (F.pad(m, (0, 0, 0, 0, 0, pad)).view(b, c, T, G, N).permute(0, 3, 1, 2, 4)[:, :, None]
                  for m in (Bm, Cm))  # [B, G, 1, c, T, N]

        # 1. Within a chunk: y_t = sum_{s<=t} exp(cs_t - cs_s) (C_t . B_s) dt_s x_s. The exponent is
        #    masked to -inf above the diagonal before exp, so no positive exponent is ever formed.
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, float("-inf")))
        y = (decay * (Cc @ Bc.transpose(-1, -2))) @ xs  # [B, G, R, c, T, T] @ [.., T, P]

        # 2. State each chunk leaves behind from its own inputs: S_c = sum_s exp(cs_T - cs_s) dt_s x_s B_s^T.
        states = (xs * torch.exp(cs[..., -1:] - cs)[..., None]).transpose(-1, -2) @ Bc  # [B, G, R, c, P, N]

        # 3. Across chunks: h_c = exp(cs_T of chunk c) h_{c-1} + S_c; chunk c starts from h_{c-1}.
        #    (unbind, not indexing, per chunk: one backward op instead of c full-size zero fills)
        chunk_decay = torch.exp(cs[..., -1])[..., None, None]  # [B, G, R, c, 1, 1]
        h, entering = torch.zeros_like(states[:, :, :, 0]), []
        for a_k, s_k in zip(chunk_decay.unbind(3), states.unbind(3)):
            entering.append(h)
            h = a_k * h + s_k
        h_in = torch.stack(entering, dim=3)  # [B, G, R, c, P, N]

        # 4. Contribution of the entering state: y_t += exp(cs_t) h_in C_t.
        y = y + torch.exp(cs)[..., None] * (Cc @ h_in.transpose(-1, -2))  # [B, G, R, c, T, P]
        y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * T, H, P)[:, :L]
    return y.to(out_dtype)


def ssd_scan_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                       Cm: torch.Tensor) -> torch.Tensor:
    """The same recurrence one token at a time in float64 (for tests only): [B, L, H, P]."""
    x, dt, A, Bm, Cm = (v.double() for v in (x, dt, A, Bm, Cm))
    b, L, H, P = x.shape
    Bm, Cm = (m.repeat_interleave(H // m.shape[2], dim=2) for m in (Bm, Cm))  # [B, L, H, N]
    h = x.new_zeros(b, H, P, Bm.shape[-1])
    ys = []
    for t in range(L):
        a = torch.exp(dt[:, t] * A)[..., None, None]  # [B, H, 1, 1]
        h = a * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]
        ys.append(h @ Cm[:, t, :, :, None])  # [B, H, P, 1]
    return torch.stack(ys, dim=1).squeeze(-1)
