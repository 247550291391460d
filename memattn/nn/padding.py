"""A key-padding pattern: per-batch "is key j a real token" as a memattn Pattern.

The exact mechanisms of :class:`memattn.nn.Attention` intersect their pattern with this one,
so padded keys are skipped by the same kernels. The predicate depends on the batch index;
the block map (analytic) is the union over batches: a key block is visited when any batch
has a real key in it, and marked full only when every key of the block is real in every
batch. Backends evaluate the predicate with the real batch index in partial tiles
(``batch_size`` tells the Triton backend to build per-batch bit tiles).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..patterns import BlockCOO, Pattern

__all__ = ["KeyPadding", "key_padding"]


@dataclass(frozen=True)
class KeyPadding(Pattern):
    """Keys allowed where ``valid[b, kv_pos]`` is True (hashable by value)."""

    batch_size: int
    length: int
    bits: bytes
    _valid: torch.Tensor = field(compare=False, hash=False, repr=False)

    def for_sizes(self, nq: int, nk: int) -> "Pattern":
        if nk != self.length:
            raise ValueError(f"key padding covers {self.length} keys, the problem has nk={nk}")
        return self

    def _valid_on(self, device: torch.device) -> torch.Tensor:
        return self._valid if self._valid.device == device else self._valid.to(device)

    def mask(self, b, h, q_pos, kv_pos):
        kv_pos = torch.as_tensor(kv_pos)
        b = torch.as_tensor(b, device=kv_pos.device)
        valid = self._valid_on(kv_pos.device)
        allowed = valid[b, kv_pos.clamp(0, self.length - 1)] & (kv_pos >= 0) & (kv_pos < self.length)
        return torch.broadcast_to(allowed, torch.broadcast_shapes(allowed.shape, torch.as_tensor(q_pos).shape))

    def _coo(self, nq, nk, block_q, block_k):
        self.for_sizes(nq, nk)
        qb_n, kb_n = -(-nq // block_q), -(-nk // block_k)
        pad = kb_n * block_k - nk
        v = torch.nn.functional.pad(self._valid.cpu(), (0, pad), value=True).view(self.batch_size, kb_n, block_k)
        any_real = torch.nn.functional.pad(self._valid.cpu(), (0, pad), value=False).view(
            self.batch_size, kb_n, block_k).any(2).any(0)                      # (KB,)
        all_real = v.all(2).all(0)                                           # (KB,)
        kb = torch.nonzero(any_real).flatten()
        qb = torch.arange(qb_n, dtype=torch.int64)
        q_idx = qb.repeat_interleave(kb.numel())
        k_idx = kb.repeat(qb_n)
        return BlockCOO.from_entries(1, qb_n, kb_n, torch.zeros_like(q_idx), q_idx, k_idx, all_real[k_idx])

    def __repr__(self) -> str:
        real = int(self._valid.sum())
        return f"key_padding(batch={self.batch_size}, length={self.length}, real={real})"


def key_padding(valid: torch.Tensor) -> KeyPadding:
    """Pattern from a (B, Nk) mask, True/1 = real key, False/0 = padding (HF convention).

    Args:
        valid: (B, Nk) bool or integer tensor.
    Returns:
        a :class:`KeyPadding` pattern (intersect it with another pattern with ``&``).

    Example:
        >>> import torch
        >>> p = key_padding(torch.tensor([[1, 1, 0]]))
        >>> p.dense(2, 3).int().tolist()
        [[1, 1, 0], [1, 1, 0]]
    """
    if not isinstance(valid, torch.Tensor) or valid.dim() != 2:
        raise ValueError(f"attention_mask must be a (B, N) tensor, got {getattr(valid, 'shape', type(valid).__name__)}")
    vb = valid.detach().to(torch.bool)
    cpu = vb.cpu().contiguous()
    return KeyPadding(vb.shape[0], vb.shape[1], cpu.numpy().tobytes(), vb)
