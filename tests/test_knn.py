"""Batched kNN: equals a brute-force reference, never picks padding or self, float32 under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from qgdist.models.knn import edge_index_from_knn, knn, knn_reference, trim_padding


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cloud(b: int = 5, p: int = 24, c: int = 3, seed: int = 0, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p, c, generator=g) + offset
    counts = torch.tensor([p, 1, 2, 8, 13][:b])  # includes jets with fewer than k + 1 real particles
    mask = torch.arange(p)[None, :] < counts[:, None]
    return x, mask


@pytest.mark.parametrize("k", [1, 4, 7])
def test_knn_equals_brute_force(k: int) -> None:
    x, mask = _cloud()
    assert torch.equal(knn(x, k, mask), knn_reference(x, k, mask))


def test_knn_never_selects_padding_or_self() -> None:
    x, mask = _cloud(p=40, c=2, seed=3)
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding at the origin, right inside the jets
    k = 7
    idx = knn(x, k, mask)
    real_neighbour = torch.gather(mask, 1, idx.reshape(x.shape[0], -1)).reshape(idx.shape)
    self_loop = idx == torch.arange(x.shape[1]).view(1, -1, 1)
    assert bool((real_neighbour | self_loop).all())
    counts = mask.sum(1)
    for j in range(x.shape[0]):
        rows = idx[j, : counts[j]]
        # self only where the jet has fewer than k other real particles, and then exactly in the unfilled slots
        expected_self = max(0, k - (int(counts[j]) - 1))
        assert int((rows == torch.arange(int(counts[j])).view(-1, 1)).sum(1).max()) == expected_self
        assert bool((idx[j, counts[j]:] == torch.arange(int(counts[j]), x.shape[1]).view(-1, 1)).all())


def test_knn_float32_distances_under_bf16_autocast() -> None:
    # Far from the origin and closely spaced: bf16 (8 bits of mantissa) would merge these points.
    x, mask = _cloud(c=2, seed=1, offset=200.0)
    x = 200.0 + (x - 200.0) * 0.05
    expected = knn_reference(x, 5, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = knn(x, 5, mask)
        # the features a bf16 model would hand over: exact bf16 values, distances still taken in float32
        xb = x.bfloat16()
        got_b = knn(xb, 5, mask)
    assert torch.equal(got, expected)
    assert torch.equal(got_b, knn_reference(xb.float(), 5, mask))


def test_ties_go_to_the_lower_index() -> None:
    half = torch.randint(-2, 3, (3, 10, 2), generator=torch.Generator().manual_seed(5)).float()
    x = torch.cat([half, -half], dim=1)  # integer points, mean exactly 0: every distance exact, many ties
    mask = torch.ones(3, 20, dtype=torch.bool)
    idx = knn(x, 6, mask)
    assert torch.equal(idx, knn_reference(x, 6, mask))  # the reference sorts by (distance, index)
    assert torch.equal(idx, knn(x.clone(), 6, mask))


def test_chunked_queries_match_one_pass() -> None:
    x, mask = _cloud(p=24)
    assert torch.equal(knn(x, 4, mask, max_elements=5 * 24 * 5), knn(x, 4, mask))


def test_k_larger_than_jet_size_gives_self_loops() -> None:
    x, mask = _cloud(b=2, p=4)
    idx = knn(x, 6, mask)
    assert idx.shape == (2, 4, 6)
    assert torch.equal(idx, knn_reference(x, 6, mask))


def test_edge_index_from_knn_packs_real_points() -> None:
    x, mask = _cloud(p=16)
    idx = knn(x, 3, mask)
    edge_index, flat_real = edge_index_from_knn(idx, mask)
    n = int(mask.sum())
    assert edge_index.shape == (2, 3 * n)
    assert torch.equal(torch.bincount(edge_index[1], minlength=n), torch.full((n,), 3))
    batch = flat_real // mask.shape[1]
    assert torch.equal(batch[edge_index[0]], batch[edge_index[1]])  # edges stay inside their jet
    dense_src = flat_real[edge_index[0]] % mask.shape[1]
    dense_dst = flat_real[edge_index[1]] % mask.shape[1]
    assert torch.equal(dense_src.view(n, 3), idx[mask][torch.arange(n), :].view(n, 3))
    assert torch.equal(dense_dst.view(n, 3)[:, 0], torch.nonzero(mask)[:, 1])


def test_trim_padding_cuts_after_the_last_real_column() -> None:
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :2] = True
    mask[2, [1, 6]] = True  # not left-aligned: trimming keeps everything up to the last real column
    feats = torch.randn(3, 10, 4)
    m, f = trim_padding(mask, feats)
    assert m.shape == (3, 7) and f.shape == (3, 7, 4)
    assert torch.equal(f, feats[:, :7]) and int(m.sum()) == int(mask.sum())
