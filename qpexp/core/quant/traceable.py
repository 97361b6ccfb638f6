"""Traceable equivalents of torch.nn modules whose ``forward`` torch.fx cannot trace.

``nn.MultiheadAttention`` runs ``F.multi_head_attention_forward`` (or a fused kernel) on its raw
``in_proj_weight``; ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` pick a fused
"fast path" in eval mode that reads every weight directly, bypassing any quantizer. Graph-level
quantization needs the individual matmuls, so :func:`make_traceable_` switches the class of each
such module (exact type only, so a user's subclass keeps its own forward) to a subclass whose
forward is the same computation written in plain ops: ``F.linear`` with the packed
``in_proj_weight``, ``q @ k^T``, softmax, ``attn @ v``, ``out_proj`` as a module call, and the
encoder layer's documented slow path. Parameters, buffers, attribute names and ``state_dict`` keys
are unchanged, ``isinstance(m, nn.MultiheadAttention)`` still holds, and the float outputs equal
torch's (tests compare them to ``1e-5``).

Masks are applied by :func:`mask_scores`, an ``fx.wrap``-ped function (one graph node, kept in
float: it feeds the softmax). Not covered (the module is left as it is, a float leaf):
``add_bias_kv``, ``add_zero_attn``; inputs must be batched (3-D).
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


def mask_scores(scores, attn_mask, key_padding_mask, is_causal: bool):
    """Apply torch's attention masks to ``scores`` (N, H, L, S): boolean masks block positions
    (``-inf``), float masks are added; ``is_causal`` blocks ``j > i`` when no ``attn_mask`` is given."""
    n, h, lq, s = scores.shape
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(lq, s, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(n, h, lq, s)
        if m.dtype == torch.bool:
            scores = scores.masked_fill(m, float("-inf"))
        else:
            scores = scores + m
    if key_padding_mask is not None:
        kp = key_padding_mask.reshape(n, 1, 1, s)
        if kp.dtype == torch.bool:
            scores = scores.masked_fill(kp, float("-inf"))
        else:
            scores = scores + kp
    return scores


torch.fx.wrap("mask_scores")


class TraceableMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with a forward in plain, fx-traceable ops (same signature and results)."""

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights: bool = True,
        attn_mask=None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        self_attention = query is key and key is value
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query = query.transpose(0, 1)
            key = query if self_attention else key.transpose(0, 1)
            value = query if self_attention else value.transpose(0, 1)
        heads, dim = self.num_heads, self.head_dim
        b = self.in_proj_bias
        if self._qkv_same_embed_dim and self_attention:
            q, k, v = F.linear(query, self.in_proj_weight, b).chunk(3, dim=-1)
        elif self._qkv_same_embed_dim:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            wq, wk, wv = self.in_proj_weight.chunk(3)
            q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        else:
            bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
            q = F.linear(query, self.q_proj_weight, bq)
            k = F.linear(key, self.k_proj_weight, bk)
            v = F.linear(value, self.v_proj_weight, bv)
        n, lq = q.shape[0], q.shape[1]
        s = k.shape[1]
        q = q.reshape(n, lq, heads, dim).transpose(1, 2)  # (N, H, L, D)
        k = k.reshape(n, s, heads, dim).transpose(1, 2)
        v = v.reshape(n, s, heads, dim).transpose(1, 2)
        scores = torch.matmul(q * math.sqrt(1.0 / dim), k.transpose(-2, -1))  # (N, H, L, S)
        if attn_mask is not None or key_padding_mask is not None or is_causal:
            scores = mask_scores(scores, attn_mask, key_padding_mask, is_causal)
        attn = scores.softmax(dim=-1)
        if self.dropout > 0.0:
            attn = F.dropout(attn, p=self.dropout, training=self.training)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(n, lq, heads * dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, attn.mean(dim=1) if average_attn_weights else attn


class TraceableTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` without the fused fast path: always torch's own slow path."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TraceableTransformerEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` without the nested-tensor fast path."""

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        out = src
        for mod in self.layers:
            out = mod(
                out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal)
            )
        if self.norm is not None:
            out = self.norm(out)
        return out


TRACEABLE = {
    nn.MultiheadAttention: TraceableMultiheadAttention,
    nn.TransformerEncoderLayer: TraceableTransformerEncoderLayer,
    nn.TransformerEncoder: TraceableTransformerEncoder,
}


def _supported(m: nn.Module) -> bool:
    if isinstance(m, nn.MultiheadAttention):
        return m.bias_k is None and not m.add_zero_attn
    return True


def make_traceable_(model: nn.Module) -> list[str]:
    """Switch every module whose exact type has a traceable equivalent to it, in place; returns the
    names of switched modules."""
    done = []
    for name, m in model.named_modules():
        new = TRACEABLE.get(type(m))
        if new is not None and _supported(m):
            m.__class__ = new
            done.append(name)
    return done
