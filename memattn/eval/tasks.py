"""Trainable long-range tasks, generated here from their published descriptions.

Multi-Query Associative Recall (Zoology, Arora et al. 2023)
    A sequence starts with D key-value pairs ``k1 v1 k2 v2 …`` (keys from the lower half of
    the vocabulary, values from the upper half); the rest holds the D keys again, in another
    order, at positions drawn with probability ∝ i^(a−1) (a = 0.01: mostly soon after the
    pairs, with a long tail). At a key's second occurrence the model must output its value.
    Accuracy counts query positions only. Choices made here: token 0 is a filler (every
    position that is not a pair or a query); the position after a query holds the filler,
    not the value, so the task is the same for causal and bidirectional mechanisms (no
    answer is visible to a model that can look ahead).

ListOps (Nangia & Bowman 2018; Long Range Arena, Tay et al. 2021)
    Nested prefix expressions ``[MAX 2 9 [MIN 4 7 ] 0 ]`` over digits with ``[MIN``,
    ``[MAX``, ``[MED`` (median; for an even count the floor of the mean of the two middle
    values) and ``[SM`` (sum mod 10); the label is the value (10 classes). Trees have depth
    at most 10 and 2–10 arguments per operator; a node above the depth limit is an operator
    with probability 0.25 and a digit otherwise (the published generator's 0.25: read as
    the chance of a leaf, trees would almost never end); the root is always an operator;
    sequences are kept when their length is within bounds (LRA: 500–2000 tokens; the
    shortened variant here: up to 1024).
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from typing import Sequence, Union

import torch

__all__ = ["mqar", "MQARBatch", "LISTOPS_VOCAB", "listops_expression", "listops_evaluate", "listops_tokens",
           "listops_dataset", "ListOpsBatch", "IGNORE"]

IGNORE = -100  # label of positions that are not scored


# ----------------------------------------------------------------------------------------------
# MQAR
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MQARBatch:
    """inputs int64 (n, L); targets int64 (n, L): the value at each query position, IGNORE elsewhere."""

    inputs: torch.Tensor
    targets: torch.Tensor


def mqar(num_examples: int, *, seq_len: int = 256, num_pairs: int = 16, vocab_size: int = 8192,
         alpha: float = 0.01, seed: int = 0) -> MQARBatch:
    """Multi-Query Associative Recall examples.

    Args:
        num_examples: n.
        seq_len: L (>= 4 · num_pairs: the pairs, then room for every query and its filler).
        num_pairs: D key-value pairs, each queried once.
        vocab_size: V (even, >= 2 · (num_pairs + 1)); keys in [1, V/2), values in [V/2, V),
            token 0 is the filler.
        alpha: query positions are drawn ∝ i^(alpha − 1) over the free slots i = 1, 2, …
        seed: the examples are a function of the arguments.
    Returns:
        MQARBatch with inputs and targets of shape (n, L).

    Example:
        >>> b = mqar(2, seq_len=64, num_pairs=4, vocab_size=32)
        >>> b.inputs.shape, int((b.targets != IGNORE).sum())
        (torch.Size([2, 64]), 8)
    """
    for name, val in (("num_examples", num_examples), ("seq_len", seq_len), ("num_pairs", num_pairs),
                      ("vocab_size", vocab_size)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if vocab_size % 2 or vocab_size < 2 * (num_pairs + 1):
        raise ValueError(f"vocab_size must be even and >= 2 * (num_pairs + 1) = {2 * (num_pairs + 1)}, got {vocab_size}")
    if seq_len < 4 * num_pairs:
        raise ValueError(f"seq_len must be >= 4 * num_pairs = {4 * num_pairs}, got {seq_len}")
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    g = torch.Generator().manual_seed(int(seed))
    n, D, L, half = num_examples, num_pairs, seq_len, vocab_size // 2
    # distinct keys per example: the first D of a random permutation of [1, V/2)
    keys = torch.argsort(torch.rand(n, half - 1, generator=g), dim=1)[:, :D] + 1
    values = torch.randint(half, vocab_size, (n, D), generator=g)
    inputs = torch.zeros(n, L, dtype=torch.int64)
    targets = torch.full((n, L), IGNORE, dtype=torch.int64)
    inputs[:, 0:2 * D:2] = keys
    inputs[:, 1:2 * D:2] = values
    slots = (L - 2 * D) // 2  # a query takes a slot of two positions (key, filler)
    weights = torch.arange(1, slots + 1, dtype=torch.float64) ** (alpha - 1.0)
    chosen = torch.multinomial(weights.expand(n, slots), D, replacement=False, generator=g)  # (n, D)
    order = torch.argsort(torch.rand(n, D, generator=g), dim=1)  # which pair each chosen slot queries
    pos = 2 * D + 2 * chosen
    rows = torch.arange(n).unsqueeze(1)
    inputs[rows, pos] = keys.gather(1, order)
    targets[rows, pos] = values.gather(1, order)
    return MQARBatch(inputs, targets)


# ----------------------------------------------------------------------------------------------
# ListOps
# ----------------------------------------------------------------------------------------------
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_VOCAB: tuple[str, ...] = ("<pad>",) + tuple(str(d) for d in range(10)) + OPERATORS + ("]",)
_TOKEN_ID = {t: i for i, t in enumerate(LISTOPS_VOCAB)}

Tree = Union[int, tuple]  # a digit, or (operator, [children])


def _apply(op: str, args: Sequence[int]) -> int:
    if op == "[MIN":
        return min(args)
    if op == "[MAX":
        return max(args)
    if op == "[MED":
        s = sorted(args)
        mid = len(s) // 2
        return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) // 2
    if op == "[SM":
        return sum(args) % 10
    raise ValueError(f"unknown operator {op!r}")


def _tree_value(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    return _apply(op, [_tree_value(c) for c in children])


def _tree_tokens(tree: Tree, out: list[str]) -> None:
    if isinstance(tree, int):
        out.append(str(tree))
        return
    op, children = tree
    out.append(op)
    for c in children:
        _tree_tokens(c, out)
    out.append("]")


def listops_evaluate(tokens: Sequence[str] | str) -> int:
    """Value of a ListOps expression given as tokens or as a space-separated string.

    Args:
        tokens: e.g. "[MAX 2 9 [MIN 4 7 ] 0 ]".
    Returns:
        The value, an int in 0..9.
    Raises:
        ValueError: an unknown token or unbalanced brackets.

    Example:
        >>> listops_evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]")
        9
        >>> listops_evaluate("[SM 5 6 [MED 1 8 3 ] ]")
        4
    """
    if isinstance(tokens, str):
        tokens = tokens.split()
    stack: list[tuple[str, list[int]]] = []
    result: int | None = None
    for t in tokens:
        if t in OPERATORS:
            stack.append((t, []))
        elif t == "]":
            if not stack:
                raise ValueError("unbalanced ']'")
            op, args = stack.pop()
            if not args:
                raise ValueError(f"operator {op} without arguments")
            val = _apply(op, args)
            if stack:
                stack[-1][1].append(val)
            else:
                if result is not None:
                    raise ValueError("more than one top-level expression")
                result = val
        elif t.isdigit() and len(t) == 1:
            if not stack:
                if result is not None or len(tokens) != 1:
                    raise ValueError("a digit outside every operator")
                result = int(t)
            else:
                stack[-1][1].append(int(t))
        else:
            raise ValueError(f"unknown ListOps token {t!r}")
    if stack or result is None:
        raise ValueError("unbalanced expression: missing ']'")
    return result


def _random_tree(rng: _random.Random, depth: int, max_depth: int, max_args: int, op_prob: float,
                 budget: list[int]) -> Tree:
    """One random tree; ``budget[0]`` counts down the tokens left (below 0: give up early)."""
    if budget[0] < 0:
        return 0
    is_op = depth == 0 or (depth < max_depth and rng.random() < op_prob)
    if not is_op:
        budget[0] -= 1
        return rng.randrange(10)
    budget[0] -= 2
    op = OPERATORS[rng.randrange(len(OPERATORS))]
    n = rng.randint(2, max_args)
    return (op, [_random_tree(rng, depth + 1, max_depth, max_args, op_prob, budget) for _ in range(n)])


def listops_expression(rng: _random.Random, *, min_len: int = 500, max_len: int = 2000, max_depth: int = 10,
                       max_args: int = 10, op_prob: float = 0.25, max_tries: int = 100000) -> tuple[list[str], int]:
    """One random ListOps expression with min_len <= tokens <= max_len, and its value.

    Args:
        rng: a ``random.Random`` (the expression is a function of its state).
        min_len, max_len: bounds on the token count (inclusive).
        max_depth: operator nesting limit (the root is depth 0).
        max_args: arguments per operator, drawn uniformly from 2..max_args.
        op_prob: chance that a node above the depth limit is an operator.
        max_tries: rejection-sampling attempts before giving up (ValueError).
    Returns:
        (tokens, value).

    Example:
        >>> toks, val = listops_expression(_random.Random(0), min_len=5, max_len=40)
        >>> listops_evaluate(toks) == val
        True
    """
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if max_depth < 1 or max_args < 2 or not 0 <= op_prob <= 1:
        raise ValueError(f"need max_depth >= 1, max_args >= 2, 0 <= op_prob <= 1; got {max_depth}, {max_args}, {op_prob}")
    for _ in range(max_tries):
        budget = [max_len]
        tree = _random_tree(rng, 0, max_depth, max_args, op_prob, budget)
        if budget[0] < 0:
            continue
        toks: list[str] = []
        _tree_tokens(tree, toks)
        if min_len <= len(toks) <= max_len:
            return toks, _tree_value(tree)
    raise ValueError(f"no expression of {min_len}..{max_len} tokens in {max_tries} tries; widen the bounds")


def listops_tokens(tokens: Sequence[str]) -> list[int]:
    """Token strings to ids of :data:`LISTOPS_VOCAB` (0 is padding)."""
    try:
        return [_TOKEN_ID[t] for t in tokens]
    except KeyError as e:
        raise ValueError(f"unknown ListOps token {e.args[0]!r}") from None


@dataclass(frozen=True)
class ListOpsBatch:
    """inputs int64 (n, Lmax) padded with 0; lengths int64 (n,); labels int64 (n,) in 0..9."""

    inputs: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    @property
    def padding_mask(self) -> torch.Tensor:
        """bool (n, Lmax): True for a real token (HF convention)."""
        return torch.arange(self.inputs.shape[1])[None, :] < self.lengths[:, None]


def listops_dataset(num_examples: int, *, min_len: int = 500, max_len: int = 2000, max_depth: int = 10,
                    max_args: int = 10, op_prob: float = 0.25, seed: int = 0) -> ListOpsBatch:
    """``num_examples`` ListOps expressions as a padded batch (see :func:`listops_expression`).

    Example:
        >>> b = listops_dataset(4, min_len=10, max_len=60)
        >>> b.inputs.shape[0], bool((b.labels < 10).all())
        (4, True)
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    rng = _random.Random(int(seed))
    seqs, labels = [], []
    for _ in range(num_examples):
        toks, val = listops_expression(rng, min_len=min_len, max_len=max_len, max_depth=max_depth,
                                       max_args=max_args, op_prob=op_prob)
        seqs.append(listops_tokens(toks))
        labels.append(val)
    lmax = max(len(s) for s in seqs)
    inputs = torch.zeros(num_examples, lmax, dtype=torch.int64)
    for i, s in enumerate(seqs):
        inputs[i, :len(s)] = torch.tensor(s)
    return ListOpsBatch(inputs, torch.tensor([len(s) for s in seqs]), torch.tensor(labels))
