"""Sparse kernels for the crosscoder: only the selected (pair, feature) entries are touched.

A BatchTopK crosscoder keeps ``n·k`` of ``n·D`` activations. The dense formulation spends most of
its time multiplying zeros: the decoder matmul and both backward matmuls. Here the encoder's
forward stays dense (every pre-activation is needed to select), while the decoder runs as an
``embedding_bag`` over active features and the encoder's weight gradient is a sparse product.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class SelectedEntries:
    """Coordinates of active (pair, feature) entries, sorted by pair.

    ``rows [m]`` pair index, ``cols [m]`` feature index, ``n`` number of pairs in the batch.
    """

    __slots__ = ("rows", "cols", "n", "offsets")

    def __init__(self, rows: Tensor, cols: Tensor, n: int):
        self.rows = rows
        self.cols = cols
        self.n = n
        counts = torch.bincount(rows, minlength=n)
        # embedding_bag wants the start of each bag; empty bags decode to zero.
        self.offsets = torch.cumsum(counts, 0) - counts

    @classmethod
    def from_flat(cls, flat_index: Tensor, n: int, width: int) -> SelectedEntries:
        flat_index, _ = torch.sort(flat_index)
        return cls(flat_index // width, flat_index % width, n)


def batch_topk(scores_nD: Tensor, n_keep: int, cost_D: Tensor | None = None) -> SelectedEntries:
    """Keep the ``n_keep`` largest strictly positive scores of the whole batch.

    ``scores_nD [n, D]``: non-negative selection scores. Entries that tie at zero are never kept,
    so a batch with fewer positive scores keeps fewer than ``n_keep``. With ``cost_D`` (DSF), each
    kept entry uses ``cost[j]`` of the budget instead of 1: entries are taken in score order until
    the budget ``n_keep`` is spent, so cheap features do not crowd out the others.
    """
    n, width = scores_nD.shape
    candidates = n_keep if cost_D is None else int(math.ceil(n_keep / float(cost_D.min())))
    candidates = min(candidates, n * width)
    flat_index = _top_flat_indices(scores_nD, candidates)
    values = scores_nD.reshape(-1)[flat_index]
    if cost_D is None:
        return SelectedEntries.from_flat(flat_index[values > 0], n, width)
    order = torch.argsort(values, descending=True)
    flat_index, values = flat_index[order], values[order]
    spent = torch.cumsum(cost_D[flat_index % width], 0)
    keep = (spent <= n_keep) & (values > 0)
    return SelectedEntries.from_flat(flat_index[keep], n, width)


def _top_flat_indices(scores_nD: Tensor, count: int) -> Tensor:
    """Flat indices of the ``count`` largest entries, as a flat top-k over all ``n·D`` would pick them.

    A flat top-k over ``n·D`` entries is slow. Instead, guess a value a little below the
    ``count``-th largest from a strided sample, keep the entries at or above it, and take the top-k
    among those. Every entry left out is below the guess and at least ``count`` entries are kept, so
    the pick is exact; when fewer are kept (a bad guess), fall back to the flat top-k. Entries that
    tie at the cut (a pair sampled twice in one batch) may be broken another way than the flat
    top-k breaks them: either is a top ``count``.
    """
    flat = scores_nD.reshape(-1)
    total = flat.numel()
    if count >= total:
        return torch.arange(total, device=flat.device)
    # A prime stride, so that the sample walks through every feature column rather than a few.
    sample = flat[::_SAMPLE_STRIDE]
    rank = 2 * count * sample.numel() // total  # about twice ``count`` entries are expected to pass
    if 0 < rank < sample.numel():
        guess = torch.topk(sample, rank, sorted=False).values.min()
        kept = torch.nonzero(~(flat < guess)).squeeze(1)  # not `>=`: a NaN must stay, as top-k ranks it first
        if kept.numel() >= count:
            return kept[torch.topk(flat[kept], count, sorted=False).indices]
    return torch.topk(flat, count, sorted=False).indices


_SAMPLE_STRIDE = 17


def threshold_select(scores_nD: Tensor, threshold: float) -> SelectedEntries:
    """Inference-time selection: every entry whose score is above ``threshold`` (and positive)."""
    n, width = scores_nD.shape
    index = torch.nonzero(scores_nD.reshape(-1) > max(threshold, 0.0)).squeeze(1)
    return SelectedEntries.from_flat(index, n, width)


def row_topk(scores_nD: Tensor, k: int) -> SelectedEntries:
    """Per-pair top-k of positive scores (used by AuxK over dead features)."""
    n, width = scores_nD.shape
    k = min(k, width)
    values, cols = torch.topk(scores_nD, k, dim=1, sorted=False)
    rows = torch.arange(n, device=scores_nD.device).unsqueeze(1).expand(n, k)
    keep = values > 0
    flat = rows[keep] * width + cols[keep]
    return SelectedEntries.from_flat(flat, n, width)


class _SelectedPreActivations(torch.autograd.Function):
    """Values of selected pre-activations, with gradients to the encoder weights and bias.

    Forward returns the already-computed values. Backward scatters their gradient into the
    encoder weights with a sparse-dense product costing ``m·d`` instead of ``n·D·d``.
    Encoder A spans features ``[0, width_a)``, encoder B spans ``[offset_b, D)``.
    """

    @staticmethod
    def forward(ctx, values_m, x_nA, x_nB, W_enc_AD, W_enc_BD, b_enc_D, rows_m, cols_m, offset_b):
        ctx.save_for_backward(x_nA, x_nB, rows_m, cols_m)
        ctx.offset_b = offset_b
        ctx.widths = (W_enc_AD.shape[1], W_enc_BD.shape[1], b_enc_D.shape[0])
        return values_m.clone()

    @staticmethod
    def backward(ctx, grad_m):
        x_nA, x_nB, rows_m, cols_m = ctx.saved_tensors
        width_a, width_b, width = ctx.widths
        n = x_nA.shape[0]

        def weight_grad(x_nd: Tensor, in_side: Tensor, side_cols: Tensor, side_width: int) -> Tensor:
            index = torch.stack([side_cols[in_side], rows_m[in_side]])
            # Sparse kernels lack bf16/fp16 on some backends: accumulate in float32.
            grad_Dn = torch.sparse_coo_tensor(
                index, grad_m[in_side].float(), (side_width, n), check_invariants=False
            )
            return torch.sparse.mm(grad_Dn, x_nd.float()).T.to(x_nd.dtype)  # [d, side_width]

        grad_W_a = weight_grad(x_nA, cols_m < width_a, cols_m, width_a)
        grad_W_b = weight_grad(x_nB, cols_m >= ctx.offset_b, cols_m - ctx.offset_b, width_b)
        grad_b = torch.zeros(width, dtype=grad_m.dtype, device=grad_m.device).index_add_(0, cols_m, grad_m)
        return None, None, None, grad_W_a, grad_W_b, grad_b, None, None, None


def selected_pre_activations(
    pre_nD: Tensor,
    entries: SelectedEntries,
    x_nA: Tensor,
    x_nB: Tensor,
    W_enc_AD: Tensor,
    W_enc_BD: Tensor,
    b_enc_D: Tensor,
    offset_b: int,
) -> Tensor:
    """Differentiable values ``pre[rows, cols]`` given the detached dense pre-activations."""
    values = pre_nD.detach()[entries.rows, entries.cols]
    return _SelectedPreActivations.apply(
        values, x_nA, x_nB, W_enc_AD, W_enc_BD, b_enc_D, entries.rows, entries.cols, offset_b
    )


def sparse_decode(entries: SelectedEntries, values_m: Tensor, W_dec_Sd: Tensor, col_offset: int = 0) -> Tensor:
    """Sum of ``values · W_dec[col - col_offset]`` per pair, over entries that fall inside W_dec.

    ``W_dec_Sd [S, d]`` covers features ``[col_offset, col_offset + S)``; returns ``[n, d]``.
    """
    side_cols = entries.cols - col_offset
    inside = (side_cols >= 0) & (side_cols < W_dec_Sd.shape[0])
    if not bool(inside.all()):
        entries = SelectedEntries(entries.rows[inside], side_cols[inside], entries.n)
        values_m, side_cols = values_m[inside], entries.cols
    if W_dec_Sd.dtype == torch.float32:
        return F.embedding_bag(side_cols, W_dec_Sd, entries.offsets, mode="sum", per_sample_weights=values_m)
    # CUDA's embedding_bag has no bf16/fp16 backward for per-sample weights: our own backward.
    return _LowPrecisionDecode.apply(values_m, W_dec_Sd, entries.rows, side_cols, entries.offsets, entries.n)


class _LowPrecisionDecode(torch.autograd.Function):
    """``embedding_bag`` forward with a hand-written backward that accumulates in float32."""

    CHUNK = 65536  # entries per chunk when gathering decoder rows: bounds the [chunk, d] temporary

    @staticmethod
    def forward(ctx, values_m, W_dec_Sd, rows_m, cols_m, offsets_n, n):
        ctx.save_for_backward(values_m, W_dec_Sd, rows_m, cols_m)
        ctx.n = n
        return F.embedding_bag(cols_m, W_dec_Sd, offsets_n, mode="sum", per_sample_weights=values_m)

    @staticmethod
    def backward(ctx, grad_nd):
        values_m, W_dec_Sd, rows_m, cols_m = ctx.saved_tensors
        grad_values = torch.empty_like(values_m)
        for start in range(0, values_m.shape[0], _LowPrecisionDecode.CHUNK):
            part = slice(start, start + _LowPrecisionDecode.CHUNK)
            grad_values[part] = (grad_nd[rows_m[part]].float() * W_dec_Sd[cols_m[part]].float()).sum(-1).to(values_m.dtype)
        selected = torch.sparse_coo_tensor(
            torch.stack([cols_m, rows_m]), values_m.float(), (W_dec_Sd.shape[0], ctx.n), check_invariants=False
        )
        grad_W = torch.sparse.mm(selected, grad_nd.float()).to(W_dec_Sd.dtype)
        return grad_values, grad_W, None, None, None, None
