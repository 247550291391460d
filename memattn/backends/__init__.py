"""Attention backends. Each module exposes ``attention(q, k, v, *, pattern, scale, softcap,
dropout_p, dropout_seed) -> (out, lse)`` on inputs already validated by memattn.api.
A backend never imports another backend."""
