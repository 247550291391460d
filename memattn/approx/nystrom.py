"""Nyströmformer (Xiong et al., 2021): softmax attention through m landmarks.

With landmarks q̃, k̃ (means of m contiguous segments of the queries and of the keys):

    out = softmax(q k̃ᵀ s) · pinv(softmax(q̃ k̃ᵀ s)) · (softmax(q̃ kᵀ s) v)

Memory O(N·m). The pseudo-inverse is the iterative Moore–Penrose scheme of the paper,
Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))) from Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞). Segment means mix
future positions, so there is no causal form.
"""

from __future__ import annotations

import torch

from ._common import check_key_mask, check_qkv, compute_dtype, group_queries, resolve_scale, softmax_with_mask, ungroup

__all__ = ["nystrom_attention", "segment_ids", "iterative_pinv"]


def segment_ids(n: int, m: int, device: torch.device | str | None = None) -> torch.Tensor:
    """int64 (n,): segment of each position when n positions are cut into m contiguous
    segments of sizes ⌊n/m⌋ or ⌈n/m⌉ (segment p starts at ⌊p·n/m⌋); needs 1 <= m <= n.

    Example:
        >>> segment_ids(5, 2).tolist()
        [0, 0, 1, 1, 1]
    """
    if not 1 <= m <= n:
        raise ValueError(f"need 1 <= m <= n, got m={m}, n={n}")
    j = torch.arange(n, dtype=torch.int64, device=device)
    # largest p with floor(p*n/m) <= j  <=>  p = floor(((j+1)*m - 1) / n)
    return torch.div((j + 1) * m - 1, n, rounding_mode="floor")


def _landmarks(x: torch.Tensor, m: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Segment means of x (..., n, d) over m segments; padded rows (mask False) excluded."""
    n = x.shape[-2]
    seg = segment_ids(n, m, x.device)
    w = torch.ones(n, dtype=x.dtype, device=x.device)
    if mask is not None:
        w = mask.to(x.dtype)                               # (..., n, 1) broadcastable
    else:
        w = w[:, None]
    onehot = torch.nn.functional.one_hot(seg, m).to(x.dtype)  # [n, m]
    sums = torch.matmul(onehot.transpose(0, 1), x * w)    # [m, n] @ [n, d] -> [m, d]
    counts = torch.matmul(onehot.transpose(0, 1), torch.broadcast_to(w, x.shape[:-1] + (1,)))
    return sums / counts.clamp_min(1.0)


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore–Penrose pseudo-inverse of the square matrices a (..., m, m) by the iteration of
    Nyströmformer (order-3 Newton–Schulz); Z₀ = aᵀ / (max column sum · max row sum) per matrix.

    Example:
        >>> a = torch.softmax(torch.randn(4, 4, dtype=torch.float64), -1)
        >>> torch.allclose(iterative_pinv(a, 30), torch.linalg.pinv(a))
        True
    """
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 0:
        raise ValueError(f"pinv_iterations must be a non-negative int, got {iterations!r}")
    m = a.shape[-1]
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
    col = a.abs().sum(-2).amax(-1, keepdim=True)[..., None]
    row = a.abs().sum(-1).amax(-1, keepdim=True)[..., None]
    z = a.transpose(-1, -2) / (col * row)
    for _ in range(iterations):
        az = torch.matmul(a, z)
        z = 0.25 * torch.matmul(z, 13 * eye - torch.matmul(az, 15 * eye - torch.matmul(az, 7 * eye - az)))
    return z


def nystrom_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_landmarks: int = 64,
                      pinv_iterations: int = 6, scale: float | None = None,
                      key_padding_mask: torch.Tensor | None = None,
                      query_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Nyström approximation of softmax attention with segment-mean landmarks.

    m = min(num_landmarks, Nq, Nk) landmarks; N need not be a multiple of m (segments of
    ⌊N/m⌋ or ⌈N/m⌉ rows). With a key mask, key landmarks average only real keys and the
    third kernel excludes padded keys.

    Args:
        q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv) (GQA allowed).
        num_landmarks: m >= 1. pinv_iterations: iterations of the pseudo-inverse (>= 0).
        scale: score scale, default D ** -0.5.
        key_padding_mask: optional (B, Nk), True = real key.
        query_padding_mask: optional (B, Nq), True = real query; query landmarks then
            average real queries only (so padded queries cannot change real outputs).
    Returns:
        (B, Hq, Nq, Dv) in q's dtype. Non-causal only.

    Example:
        >>> q, k, v = (torch.randn(1, 2, 1000, 32) for _ in range(3))
        >>> nystrom_attention(q, k, v, num_landmarks=32).shape
        torch.Size([1, 2, 1000, 32])
    """
    check_qkv(q, k, v)
    if not isinstance(num_landmarks, int) or isinstance(num_landmarks, bool) or num_landmarks < 1:
        raise ValueError(f"num_landmarks must be a positive int, got {num_landmarks!r}")
    if not isinstance(pinv_iterations, int) or isinstance(pinv_iterations, bool) or pinv_iterations < 0:
        raise ValueError(f"pinv_iterations must be a non-negative int, got {pinv_iterations!r}")
    scale = resolve_scale(scale, q.shape[-1])
    km = check_key_mask(key_padding_mask, k)
    cdt = compute_dtype(q.dtype)
    Hkv, Nq, Nk = k.shape[1], q.shape[2], k.shape[2]
    m = min(num_landmarks, Nq, Nk)
    q5 = group_queries(q, Hkv).to(cdt)                 # [B,Hkv,g,Nq,D]
    k5, v5 = k.unsqueeze(2).to(cdt), v.unsqueeze(2).to(cdt)
    kmask = None if km is None else km[:, None, None, :, None]
    qmask = None
    if query_padding_mask is not None:
        if not isinstance(query_padding_mask, torch.Tensor) or query_padding_mask.shape != (q.shape[0], Nq):
            raise ValueError(f"query_padding_mask must have shape (B, Nq) = {(q.shape[0], Nq)}")
        qmask = query_padding_mask.to(device=q.device, dtype=torch.bool)[:, None, None, :, None]
    ql = _landmarks(q5, m, qmask)                      # [B,Hkv,g,m,D]
    kl = _landmarks(k5, m, kmask)                      # [B,Hkv,1,m,D]
    f = torch.softmax(torch.matmul(q5, kl.transpose(-1, -2)) * scale, dim=-1)        # [Nq, m]
    a = torch.softmax(torch.matmul(ql, kl.transpose(-1, -2)) * scale, dim=-1)        # [m, m]
    allowed = None if km is None else km[:, None, None, None, :]
    b = softmax_with_mask(torch.matmul(ql, k5.transpose(-1, -2)) * scale, allowed)   # [m, Nk]
    z = iterative_pinv(a, pinv_iterations)
    out = torch.matmul(f, torch.matmul(z, torch.matmul(b, v5)))
    return ungroup(out).to(q.dtype)
