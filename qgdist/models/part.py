"""Particle Transformer (ParT; Qu, Li, Qian, arXiv:2202.03772), the same function as weaver-core's
``weaver.nn.model.ParticleTransformer`` in eval mode (tests/models/test_part_reference.py), faster to train.

Architecture (the paper's quark/gluon configuration, weaver's ``version=1``): the particle features go through a
batch norm and three (LayerNorm, Linear, GELU) layers to 128 channels; every pair of particles (i >= j) gets four
features of the two four-momenta, ln kT, ln z, ln dR and ln m^2 (``pair_features``), embedded by 1x1 layers
(BatchNorm, Linear 64-64-64-8 with batch norms and GELUs) into one attention bias per head, symmetric in (i, j);
eight particle-attention blocks (pre-LayerNorm multi-head self-attention with that bias, per-head scale, post-
attention and post-FFN LayerNorms, FFN 128-512-128, scaled residual), two class-attention blocks in which a class
token attends to the particles, a LayerNorm and one output logit (quark positive).

Inputs follow the batch contract (docs/ARCHITECTURE.md) plus the four-momenta: ``model(points=(B,P,2),
features=(B,P,C), mask=(B,P) bool, vectors=(B,P,4) = (px, py, pz, E))``; ``points`` is not used (ParT has no kNN).

Two layouts, one function (``ParTConfig.layout``):

* **packed** (the CPU default): every per-particle layer runs on the real particles only, (N, C) rows (a quark/
  gluon batch is about half padding); the pair embedding runs on the real pairs i >= j only, as weaver's sparse
  path does; attention runs per group of jets of similar length (jets sorted by length, cut into
  ``attention_groups`` groups, each padded only to its own longest jet), so the (P, P) score matrices skip most
  padding. One host sync per batch (the jet lengths).
* **padded** (GPUs, tracing, ONNX): static (B, P) shapes, no host sync; batch-norm statistics from the real
  particles and real pairs only (``MaskedBatchNorm``), padded keys masked in every attention.

Padding-safe: a jet's logit does not depend on the padding (values or amount), in training mode too. (weaver's
input batch norm counts padded slots in its training statistics; in eval mode the two are equal.) The pair
features are computed in the precision of ``vectors`` (at least float32) whatever the autocast: ``ln m^2`` of a
nearly collinear pair cancels, so the loader hands float64 four-momenta (measured on one toy batch: 192 of 222k
pairs moved by up to 12.9 in ``ln m^2`` between float32- and float64-stored copies of the same jets). Batch and
layer norms normalise in float32, the attention bias is cast to the attention's dtype; jets must hold at least
one particle (the loader never yields empty jets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from qgdist.models.compiling import eager_only
from qgdist.models.edgeconv import MaskedBatchNorm

_EPS = 1e-8


@dataclass
class ParTConfig:
    """Hyper-parameters of the Particle Transformer (defaults: the paper's quark/gluon model on ``kin``)."""

    in_features: int = 7
    embed_dims: tuple[int, ...] = (128, 512, 128)
    pair_embed_dims: tuple[int, ...] = (64, 64, 64)
    num_heads: int = 8
    num_layers: int = 8
    num_cls_layers: int = 2
    ffn_ratio: int = 4
    dropout: float = 0.1              # particle blocks: after attention and after the FFN
    attn_dropout: float = 0.1         # on the attention weights
    activation_dropout: float = 0.1   # inside the FFN
    #: weaver's ``use_pre_activation_pair``: False (the ParT quark/gluon config) ends the pair embedding in a GELU
    pre_activation_pair: bool = False
    #: Jets per attention group are sorted by length; more groups: less padding, more (smaller) attention calls.
    attention_groups: int = 4
    #: "packed" (real particles only; the CPU default), "padded" (static shapes, no host sync; GPUs, tracing,
    #: ONNX) or "auto".
    layout: str = "auto"


# -- pair features ----------------------------------------------------------------------------------------------------
def particle_kinematics(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pt, rapidity, phi) of four-momenta v (..., 4) = (px, py, pz, E), as weaver's ``to_ptrapphim``."""
    px, py, pz, e = v.unbind(-1)
    pt = torch.sqrt(px * px + py * py)
    rap = 0.5 * torch.log(1 + (2 * pz) / (e - pz).clamp(min=1e-20))
    return pt, rap, torch.atan2(py, px)


def pair_features(kin_i: tuple[torch.Tensor, ...], kin_j: tuple[torch.Tensor, ...], v_i: torch.Tensor,
                  v_j: torch.Tensor) -> torch.Tensor:
    """(..., 4) = ln kT, ln z, ln dR, ln m^2 of particle pairs, from their (pt, rapidity, phi) and four-momenta
    (ParT paper eq. 3; the same float32 operations as weaver's ``pairwise_lv_fts_pp``)."""
    pt_i, rap_i, phi_i = kin_i
    pt_j, rap_j, phi_j = kin_j
    dphi = torch.remainder(phi_i - phi_j + math.pi, 2 * math.pi) - math.pi
    delta = torch.sqrt((rap_i - rap_j) ** 2 + dphi ** 2)
    ptmin = torch.minimum(pt_i, pt_j)
    lnkt = torch.log((ptmin * delta).clamp(min=_EPS))
    lnz = torch.log((ptmin / (pt_i + pt_j).clamp(min=_EPS)).clamp(min=_EPS))
    lndelta = torch.log(delta.clamp(min=_EPS))
    s = v_i + v_j
    sx, sy, sz, se = s.unbind(-1)
    lnm2 = torch.log((se.square() - (sx.square() + sy.square() + sz.square())).clamp(min=_EPS))
    return torch.stack([lnkt, lnz, lndelta, lnm2], dim=-1)


# -- where the particles and pairs are: one plan per batch -----------------------------------------------------------
class Group(NamedTuple):
    """Jets attended together: ``jets`` (G,) of the batch, each given ``width`` token slots starting at slot
    ``start``; ``keys`` (G, width) bool marks the slots that hold a particle."""

    jets: torch.Tensor
    width: int
    start: int
    keys: torch.Tensor


@dataclass
class Plan:
    """Where one batch's tokens and pairs are (``packed_plan`` / ``padded_plan``).

    Tokens live in **slots**: group after group, each jet of a group in ``width`` consecutive slots (its particles
    first, then copies of its last particle that no attention ever reads), so every attention is a plain view.
    """

    batch: int
    slots: int
    src: torch.Tensor | None          # packed: (slots,) real-particle row of each slot; padded: None (slot = b * P + i)
    token_mask: torch.Tensor | None   # padded: (slots,) bool, the real particles (for the input batch norm)
    groups: list[Group]
    jet_order: torch.Tensor | None    # packed: the jets in slot order (cat of the groups'); padded: None (0..B-1)
    pair_i: torch.Tensor              # (E,) particle row of the first particle of each pair (i >= j)
    pair_j: torch.Tensor
    pair_mask: torch.Tensor | None    # padded: (E,) real pairs
    pair_dest: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]
    # per group: its pairs [lo, hi), flat (g, i, j) of each, and of the pairs with i != j, flat (g, j, i)


def padded_plan(mask: torch.Tensor) -> Plan:
    """Static shapes, no host sync: every (jet, slot) is a token, one group of all jets, every pair i >= j."""
    b, p = mask.shape
    dev = mask.device
    ti, tj = torch.tril_indices(p, p, device=dev)
    base = (torch.arange(b, device=dev) * p).view(b, 1)
    pair_i, pair_j = (base + ti).reshape(-1), (base + tj).reshape(-1)
    pair_mask = (mask[:, ti] & mask[:, tj]).reshape(-1)
    dest_base = (torch.arange(b, device=dev) * p * p).view(b, 1)
    lower = (dest_base + ti * p + tj).reshape(-1)
    # the pairs with i > j, found by arithmetic (a nonzero() would be a host sync): (i, j) is tril entry i(i+1)/2 + j
    si, sj = torch.tril_indices(p, p, offset=-1, device=dev)
    off = ((torch.arange(b, device=dev) * ti.numel()).view(b, 1) + si * (si + 1) // 2 + sj).reshape(-1)
    upper = (dest_base + sj * p + si).reshape(-1)
    group = Group(torch.arange(b, device=dev), p, 0, mask)
    return Plan(b, b * p, None, mask.reshape(-1), [group], None, pair_i, pair_j, pair_mask,
                [(0, lower.numel(), lower, off, upper)])


def packed_plan(mask: torch.Tensor, groups: int = 4) -> Plan:
    """Real particles only, jets grouped by length (each group padded to its own longest jet), the real pairs
    i >= j of every jet. Reads the jet lengths on the host (one sync)."""
    b, p = mask.shape
    dev = mask.device
    counts = mask.sum(1)
    lengths = counts.cpu()
    starts = torch.cumsum(counts, 0) - counts
    order = torch.argsort(counts, stable=True)
    sorted_lengths = torch.sort(lengths, stable=True).values.tolist()
    if sorted_lengths and sorted_lengths[0] == 0:
        raise ValueError("a jet without particles: every jet needs at least one (the converter rejects empty jets)")
    n_groups = max(1, min(groups, b))
    cuts = [round(i * b / n_groups) for i in range(n_groups + 1)]
    plan_groups, srcs, pairs_i, pairs_j, pair_dest = [], [], [], [], []
    slot, n_pairs = 0, 0
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi <= lo:
            continue
        g_jets, width = order[lo:hi], int(sorted_lengths[hi - 1])
        g_counts, g_starts = counts[g_jets], starts[g_jets]
        local = torch.arange(width, device=dev)
        plan_groups.append(Group(g_jets, width, slot, local < g_counts[:, None]))
        srcs.append((g_starts[:, None] + torch.minimum(local, g_counts[:, None] - 1)).reshape(-1))
        slot += len(g_jets) * width
        ti, tj = torch.tril_indices(width, width, device=dev)
        valid = (ti[None, :] < g_counts[:, None]).nonzero()          # (pairs, 2): (jet in group, tril index)
        gj, t = valid[:, 0], valid[:, 1]
        i, j = ti[t], tj[t]
        pairs_i.append(g_starts[gj] + i)
        pairs_j.append(g_starts[gj] + j)
        off = (i != j).nonzero().squeeze(1)
        lower = gj * width * width + i * width + j
        upper = (gj * width * width + j * width + i).index_select(0, off)
        pair_dest.append((n_pairs, n_pairs + len(gj), lower, off, upper))
        n_pairs += len(gj)
    return Plan(b, slot, torch.cat(srcs), None, plan_groups, order, torch.cat(pairs_i), torch.cat(pairs_j), None,
                pair_dest)


# -- layers ---------------------------------------------------------------------------------------------------------------
class PairEmbed(nn.Module):
    """Pair features -> one attention bias per head: BatchNorm, then (Linear, BatchNorm, GELU) per width."""

    def __init__(self, dims: tuple[int, ...], pre_activation: bool) -> None:
        super().__init__()
        self.input_norm = MaskedBatchNorm(4)
        widths = (4, *dims)
        self.linears = nn.ModuleList(nn.Linear(a, c) for a, c in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(MaskedBatchNorm(c) for c in widths[1:])
        self.pre_activation = pre_activation

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (E, 4) float32 -> (E, heads); with ``mask`` (E,) the statistics are the real pairs' and the rest
        comes out zero."""
        m = None if mask is None else mask.unsqueeze(-1).to(x.dtype)
        x = self.input_norm(x if m is None else x * m, mask)
        last = len(self.linears) - 1
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            x = linear(x)
            x = norm(x if m is None else x * m, mask)
            if i < last or not self.pre_activation:
                x = F.gelu(x)
        return x


class Attention(nn.Module):
    """Multi-head attention weights (``in_proj`` for q, k, v; ``out_proj``), weaver's parameter layout."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)


class Block(nn.Module):
    """A ParT block: particle attention (``forward``) or class attention (``forward_cls``)."""

    def __init__(self, dim: int, heads: int, ffn_ratio: int, dropout: float, attn_dropout: float,
                 activation_dropout: float) -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.pre_attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.post_attn_norm = nn.LayerNorm(dim)
        self.pre_fc_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * ffn_ratio)
        self.post_fc_norm = nn.LayerNorm(dim * ffn_ratio)
        self.fc2 = nn.Linear(dim * ffn_ratio, dim)
        self.c_attn = nn.Parameter(torch.ones(heads))
        self.w_resid = nn.Parameter(torch.ones(dim))
        self.dropout, self.attn_dropout, self.activation_dropout = dropout, attn_dropout, activation_dropout

    def _tail(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """out_proj, per-head scale, post-attention norm, residual, then the FFN with its scaled residual."""
        x = self.attn.out_proj(attended)
        x = (x.unflatten(-1, (self.heads, -1)) * self.c_attn.unsqueeze(-1)).flatten(-2)
        x = F.dropout(self.post_attn_norm(x), self.dropout, self.training) + residual
        h = F.gelu(self.fc1(self.pre_fc_norm(x)))
        h = self.post_fc_norm(F.dropout(h, self.activation_dropout, self.training))
        h = F.dropout(self.fc2(h), self.dropout, self.training)
        return h + self.w_resid * x

    def forward(self, x: torch.Tensor, plan: Plan, biases: list[torch.Tensor]) -> torch.Tensor:
        """x (slots, D) -> (slots, D): every particle attends to the particles of its jet, with the pair bias."""
        qkv = self.attn.in_proj(self.pre_attn_norm(x))
        p = self.attn_dropout if self.training else 0.0
        outs = []
        for group, bias in zip(plan.groups, biases):
            g, w = len(group.jets), group.width
            q, k, v = qkv[group.start: group.start + g * w].view(g, w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p)
            outs.append(o.transpose(1, 2).reshape(g * w, self.dim))
        return self._tail(outs[0] if len(outs) == 1 else torch.cat(outs), x)

    def forward_cls(self, x: torch.Tensor, cls: torch.Tensor, plan: Plan) -> torch.Tensor:
        """cls (B, D), in slot order: the class token attends to itself and its jet's particles x (slots, D)."""
        w_in, b_in = self.attn.in_proj.weight, self.attn.in_proj.bias
        q = F.linear(cls, w_in[: self.dim], b_in[: self.dim])                    # the raw token is the query
        kv = F.linear(self.pre_attn_norm(x), w_in[self.dim:], b_in[self.dim:])   # (slots, 2D)
        kv_cls = F.linear(self.pre_attn_norm(cls), w_in[self.dim:], b_in[self.dim:])
        outs, first = [], 0
        for group in plan.groups:
            g, w = len(group.jets), group.width
            rows = kv[group.start: group.start + g * w].view(g, w, -1)
            keys = torch.cat([kv_cls[first: first + g].unsqueeze(1), rows], 1)
            k, v = keys.view(g, w + 1, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
            qg = q[first: first + g].view(g, 1, self.heads, -1).transpose(1, 2)
            allowed = F.pad(group.keys, (1, 0), value=True).view(g, 1, 1, w + 1)
            outs.append(F.scaled_dot_product_attention(qg, k, v, attn_mask=allowed).transpose(1, 2).reshape(g, -1))
            first += g
        return self._tail(outs[0] if len(outs) == 1 else torch.cat(outs), cls)


class ParticleTransformer(nn.Module):
    """``model(points, features, mask, vectors) -> logits (B,)``; see the module docstring."""

    kind = "cloud"
    #: Model inputs beyond the batch contract's (the loader adds them for models that ask).
    extra_inputs = ("vectors",)

    def __init__(self, config: ParTConfig) -> None:
        super().__init__()
        if config.layout not in ("auto", "padded", "packed"):
            raise ValueError(f"layout must be 'auto', 'padded' or 'packed', got {config.layout!r}")
        self.config = c = config
        dim = c.embed_dims[-1]
        self.input_norm = MaskedBatchNorm(c.in_features)
        layers: list[nn.Module] = []
        width = c.in_features
        for d in c.embed_dims:
            layers += [nn.LayerNorm(width), nn.Linear(width, d), nn.GELU()]
            width = d
        self.embed = nn.Sequential(*layers)
        self.pair_embed = PairEmbed((*c.pair_embed_dims, c.num_heads), c.pre_activation_pair)
        self.blocks = nn.ModuleList(Block(dim, c.num_heads, c.ffn_ratio, c.dropout, c.attn_dropout,
                                          c.activation_dropout) for _ in range(c.num_layers))
        self.cls_blocks = nn.ModuleList(Block(dim, c.num_heads, c.ffn_ratio, 0.0, 0.0, 0.0)
                                        for _ in range(c.num_cls_layers))
        self.cls_token = nn.Parameter(torch.zeros(1, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        """The paper's initialisation: Xavier-uniform Linear weights (q, k, v each on its own fan), zero biases,
        a truncated-normal class token, and each block's output projections scaled by 1/sqrt(2 * depth)."""
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("in_proj"):
                    bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        with torch.no_grad():
            for depth, block in enumerate(self.blocks, start=1):
                block.attn.out_proj.weight.div_(math.sqrt(2.0 * depth))
                block.fc2.weight.div_(math.sqrt(2.0 * depth))

    def packed_layout(self, features: torch.Tensor) -> bool:
        if self.config.layout != "auto":
            return self.config.layout == "packed"
        return features.device.type == "cpu" and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())

    def plan(self, mask: torch.Tensor, packed: bool) -> Plan:
        return _packed_plan(mask, self.config.attention_groups) if packed else padded_plan(mask)

    def forward(self, points: torch.Tensor, features: torch.Tensor, mask: torch.Tensor,
                vectors: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.config.in_features:
            raise ValueError(f"model built with in_features={self.config.in_features} got features of shape "
                             f"{tuple(features.shape)}")
        if vectors.shape[:2] != mask.shape or features.shape[:2] != mask.shape or vectors.shape[-1] != 4:
            raise ValueError(f"features {tuple(features.shape)}, vectors {tuple(vectors.shape)} and mask "
                             f"{tuple(mask.shape)} disagree (vectors are (B, P, 4) = px, py, pz, E)")
        mask = mask.bool()
        b, p = mask.shape
        plan = self.plan(mask, self.packed_layout(features))
        flat_features, flat_vectors = features.reshape(b * p, -1), vectors.reshape(b * p, 4)
        if plan.src is not None:   # packed: the real particles' rows, normalised and embedded, then into slots
            rows = mask.reshape(-1).nonzero().squeeze(1)
            flat_vectors = flat_vectors.index_select(0, rows)
            x = self.embed(self.input_norm(flat_features.index_select(0, rows))).index_select(0, plan.src)
        else:
            m = plan.token_mask.unsqueeze(-1).to(features.dtype)
            x = self.embed(self.input_norm(flat_features * m, plan.token_mask))
        biases = self._pair_biases(flat_vectors, plan)
        for block in self.blocks:
            x = block(x, plan, biases)
        cls = self.cls_token.expand(b, -1).to(x.dtype)
        for block in self.cls_blocks:
            cls = block.forward_cls(x, cls, plan)
        logits = self.head(self.norm(cls)).squeeze(-1).float()
        if plan.jet_order is None:
            return logits
        return logits.new_empty(b).index_copy(0, plan.jet_order, logits)   # slot order -> batch order

    def _pair_biases(self, vectors: torch.Tensor, plan: Plan) -> list[torch.Tensor]:
        """Per attention group, (G, heads, width, width): the embedded pair features, symmetric, and -inf where
        the key is padding.

        The features are computed in the precision of ``vectors``, at least float32, whatever the autocast: ln m^2
        of a nearly collinear pair is a difference of squares of ~10^5 GeV^2 that float32 rounds to noise (the
        loader hands float64 four-momenta; weaver-core computes in float32, as ours does on float32 input)."""
        wide = torch.promote_types(vectors.dtype, torch.float32)
        with torch.autocast(vectors.device.type, enabled=False):
            v = vectors.to(wide)
            kin = particle_kinematics(v)
            pi, pj = plan.pair_i, plan.pair_j
            feats = pair_features(tuple(t.index_select(0, pi) for t in kin), tuple(t.index_select(0, pj) for t in kin),
                                  v.index_select(0, pi), v.index_select(0, pj))
        emb = self.pair_embed(feats.to(self.pair_embed.input_norm.weight.dtype), plan.pair_mask)
        emb = emb.to(torch.promote_types(emb.dtype, torch.float32))
        heads = emb.shape[-1]
        out = []
        for group, (lo, hi, lower, off, upper) in zip(plan.groups, plan.pair_dest):
            g, w = len(group.jets), group.width
            e = emb[lo:hi]
            dense = emb.new_zeros(g * w * w, heads).index_copy(0, lower, e).index_copy(0, upper, e.index_select(0, off))
            bias = dense.view(g, w, w, heads).permute(0, 3, 1, 2)
            out.append(bias.masked_fill(~group.keys.view(g, 1, 1, w), float("-inf")).contiguous())
        return out


#: The plan reads jet lengths on the host: never compiled (``torch.compile`` breaks the graph there).
_packed_plan = eager_only(packed_plan)


def particle_transformer(**cfg) -> ParticleTransformer:
    """The Particle Transformer of the paper's quark/gluon study (~2.1M parameters)."""
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    return ParticleTransformer(ParTConfig(**cfg))
