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
    got, expected = knn(x, k, mask), knn_reference(x, k, mask)
    assert got.dtype == expected.dtype == torch.int64 and torch.equal(got, expected)   # indices, to gather with


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

    # A batch of empty jets keeps one (padding) column: downstream shapes stay valid, nothing real is invented.
    m, f = trim_padding(torch.zeros(2, 10, dtype=torch.bool), feats[:2])
    assert m.shape == (2, 1) and f.shape == (2, 1, 4) and not m.any()


def _tie_heavy_cloud(seed: int):
    g = torch.Generator().manual_seed(seed)
    b, p = 4, int(torch.randint(2, 40, (1,), generator=g))
    half = torch.randint(-3, 4, (b, p, 2), generator=g).float()
    x = torch.cat([half, -half], 1)  # integer points, mean 0: exact float32 distances, many exact ties
    mask = torch.rand(b, 2 * p, generator=g) < 0.7  # real points not left-aligned, some short jets
    return x, mask


@pytest.mark.parametrize("seed", range(12))
def test_cpu_float_topk_path_equals_the_int64_key_path(seed: int) -> None:
    # The CPU picks candidates with a float topk and re-orders them by (distance, index); CUDA and compiled graphs
    # use int64 keys. Both must give the same neighbours, ties and self-loops included.
    x, mask = _tie_heavy_cloud(seed)
    for k in (1, 3, 7, 16):
        assert torch.equal(knn(x, k, mask, method="float"), knn(x, k, mask, method="keys")), k
    full = torch.ones_like(mask)
    assert torch.equal(knn(x, 5, full), knn_reference(x, 5, full))


def test_reduced_precision_matmul_is_switched_off_inside_the_knn(monkeypatch: pytest.MonkeyPatch) -> None:
    # set_float32_matmul_precision("medium") lets oneDNN run float32 GEMMs in bf16 on CPUs with AMX/AVX512-BF16
    # (TF32 on CUDA is the same trap): the distances would no longer be float32. Close points far from the origin.
    import qgdist.models.knn as knn_module

    g = torch.Generator().manual_seed(0)
    x = 50.0 + 0.01 * torch.randn(3, 30, 16, generator=g)
    mask = torch.ones(3, 30, dtype=torch.bool)
    seen = []
    real_baddbmm = torch.baddbmm

    def spy(*args, **kwargs):
        seen.append(torch.backends.mkldnn.matmul.fp32_precision)
        return real_baddbmm(*args, **kwargs)

    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        monkeypatch.setattr(knn_module.torch, "baddbmm", spy)
        got = knn(x, 6, mask)
        monkeypatch.undo()
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # the user's setting is restored
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before
    assert seen == ["ieee"]
    assert torch.equal(got, knn_reference(x, 6, mask))


def test_tf32_is_switched_off_and_restored_for_cuda() -> None:
    from qgdist.models.knn import full_precision_matmul

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with full_precision_matmul("cuda"):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


@pytest.mark.parametrize("groups", [1, 3])
def test_packed_knn_equals_the_padded_knn(groups: int) -> None:
    from qgdist.models.knn import knn_packed, pack, packed_edge_index, packed_neighbours

    g = torch.Generator().manual_seed(2)
    b, p, c = 7, 30, 5
    x = torch.randn(b, p, c, generator=g)
    mask = torch.rand(b, p, generator=g) < torch.linspace(0.05, 0.9, b).unsqueeze(1)  # lengths 0 .. ~27
    mask[0] = False  # an empty jet
    mask[1] = False
    mask[1, 3] = True  # a one-particle jet: its own only neighbour, like the padded kNN says
    packing = pack(mask, knn_groups=groups)
    packed_x = x.reshape(b * p, c)[packing.rows]
    assert torch.equal(packing.batch, torch.nonzero(mask)[:, 0]) and packing.batch.dtype == torch.int64
    for k in (1, 4, 7):
        dense = knn(x, k, mask)
        got = knn_packed(packed_x, k, packing)
        assert torch.equal(got, packed_neighbours(dense, packing))
        edge_index, _ = edge_index_from_knn(dense, mask)
        assert torch.equal(packed_edge_index(got), edge_index)


def test_direct_distances_the_compiled_cuda_path_uses_agree_with_the_gemm_form() -> None:
    # Compiled for CUDA the kNN computes sum((a - b)^2) instead of the GEMM (TF32 cannot reach it); same rules.
    x, mask = _cloud(p=24, c=5, seed=7)
    for k in (1, 4, 7):
        assert torch.equal(knn(x, k, mask, distance="direct"), knn_reference(x, k, mask))
        assert torch.equal(knn(x, k, mask, distance="direct", method="keys"), knn(x, k, mask))
    ties, full = _tie_heavy_cloud(3)[0], None
    assert torch.equal(knn(ties, 5, full, distance="direct"), knn(ties, 5, full))


@pytest.mark.parametrize(("call", "message"), [
    (lambda x: knn(x[0], 3), "knn expects x of shape (B, P, C), got (24, 3)"),
    (lambda x: knn(x, 0), "k must be >= 1, got 0"),
    (lambda x: knn(x, 3, method="topk"), "method must be 'auto', 'keys' or 'float', got 'topk'"),
    (lambda x: knn(x, 3, distance="cdist"), "distance must be 'auto', 'gemm' or 'direct', got 'cdist'"),
])
def test_a_wrong_argument_is_refused_naming_it(call, message: str) -> None:
    x, _ = _cloud()
    with pytest.raises(ValueError) as err:
        call(x)
    assert str(err.value) == message
