"""Attention heads as prunable channels, and what an attention module becomes once heads are removed.

Head ``h`` of an ``nn.MultiheadAttention`` (``E = embed_dim``, ``H`` heads of ``d = E / H``) owns rows
``[h d, (h+1) d)`` of the query, key and value projections (``in_proj_weight`` and ``in_proj_bias``,
or ``q/k/v_proj_weight``) and columns ``[h d, (h+1) d)`` of ``out_proj.weight``. Masking all of them
makes the head's queries, keys and values zero: its attention is uniform over zero values, so it
adds exactly nothing to the output, and the head can be removed.

``nn.MultiheadAttention`` cannot hold fewer heads than ``embed_dim / head_dim`` (its projections
are ``E x E``), so a module that loses heads is replaced by :class:`HeadPrunedAttention`: the same
computation (same arguments, same outputs) with ``q_proj``/``k_proj``/``v_proj``/``out_proj`` as
plain ``nn.Linear`` layers of ``H' d`` rows, and the two attention matmuls written out
(``softmax(q k^T / sqrt(d)) v``), so quantization and export see ordinary linear layers and matmuls.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def is_attention(m: nn.Module) -> bool:
    return isinstance(m, (nn.MultiheadAttention, HeadPrunedAttention))


def head_slices(m: nn.Module) -> tuple[int, list[list[tuple[nn.Module, str, int, torch.Tensor]]]]:
    """(number of heads, per head: ``(module, param, dim, indices)`` of every slice it owns)."""
    h, d = m.num_heads, m.head_dim
    inner = h * d
    out: list[list] = []
    for i in range(h):
        rows = torch.arange(i * d, (i + 1) * d)
        sl = []
        if isinstance(m, HeadPrunedAttention):
            for p in ("q_proj", "k_proj", "v_proj"):
                lin = getattr(m, p)
                sl.append((lin, "weight", 0, rows))
                if lin.bias is not None:
                    sl.append((lin, "bias", 0, rows))
        else:
            qkv = torch.cat([rows, rows + inner, rows + 2 * inner])
            if m.in_proj_weight is not None:
                sl.append((m, "in_proj_weight", 0, qkv))
            else:
                for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    sl.append((m, p, 0, rows))
            if m.in_proj_bias is not None:
                sl.append((m, "in_proj_bias", 0, qkv))
        sl.append((m.out_proj, "weight", 1, rows))
        out.append(sl)
    return h, out


def unsupported(m: nn.Module) -> str | None:
    """Why the heads of ``m`` cannot be pruned (None: they can)."""
    if getattr(m, "bias_k", None) is not None or getattr(m, "add_zero_attn", False):
        return "its extra key/value (add_bias_kv / add_zero_attn) would still reach a masked head"
    return None


class HeadPrunedAttention(nn.Module):
    """``nn.MultiheadAttention`` with some heads removed; same ``forward`` arguments and outputs."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        kdim: int | None = None,
        vdim: int | None = None,
    ):
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_attention(cls, m: nn.Module, keep: list[int]) -> HeadPrunedAttention:
        """The heads ``keep`` of ``m`` (an ``nn.MultiheadAttention`` or a head-pruned one)."""
        d = m.head_dim
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
        if isinstance(m, HeadPrunedAttention):
            ws = [getattr(m, p).weight for p in ("q_proj", "k_proj", "v_proj")]
            bs = [getattr(m, p).bias for p in ("q_proj", "k_proj", "v_proj")]
            kdim, vdim = m.k_proj.in_features, m.v_proj.in_features
        else:
            e = m.embed_dim
            if m.in_proj_weight is not None:
                ws = list(m.in_proj_weight.split(e))
            else:
                ws = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
            bs = list(m.in_proj_bias.split(e)) if m.in_proj_bias is not None else [None] * 3
            kdim, vdim = m.kdim, m.vdim
        bias = bs[0] is not None
        new = cls(m.embed_dim, len(keep), d, bias, m.batch_first, m.dropout, kdim, vdim)
        new = new.to(device=ws[0].device, dtype=ws[0].dtype)
        for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), ws, bs):
            lin.weight.copy_(w[rows])
            if b is not None:
                lin.bias.copy_(b[rows])
        new.out_proj.weight.copy_(m.out_proj.weight[:, rows])
        if m.out_proj.bias is not None:
            new.out_proj.bias.copy_(m.out_proj.bias)
        new.train(m.training)
        return new

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q = self._heads(self.q_proj(query))  # (N, H, L, d)
        k = self._heads(self.k_proj(key))
        v = self._heads(self.v_proj(value))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if is_causal and attn_mask is None:
            n_q, n_k = scores.shape[-2:]
            attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:  # (N * heads, L, S)
                attn_mask = attn_mask.reshape(q.shape[0], self.num_heads, *attn_mask.shape[-2:])
            scores = (
                scores.masked_fill(attn_mask, float("-inf"))
                if attn_mask.dtype == torch.bool
                else scores + attn_mask
            )
        if key_padding_mask is not None:
            kpm = key_padding_mask[:, None, None, :]
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = torch.softmax(scores, dim=-1)
        weights = attn
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = torch.matmul(attn, v).transpose(1, 2)  # (N, L, H, d)
        out = self.out_proj(out.reshape(out.shape[0], out.shape[1], self.num_heads * self.head_dim))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
