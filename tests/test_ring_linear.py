"""The left-product ring baseline against the float64 dense oracle on 1, 2, 3 and 4 gloo ranks, with its exchanges."""
import pytest
import torch
import torch.distributed as dist

from tests.dist import rel_err, run_ranks
from tests.oracles import linear_attention_dense

# a head with λ = 1, a mild decay, and one whose λ^gap underflows to 0 across blocks
DECAY = torch.tensor([0.0, -0.05, -60.0])
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
B, H, D_K, D_V = 2, 3, 4, 5


def _case(W, causal, log_decay, dtype, C=7, seed=0):
    """One call on this rank's shard -> (errors o, dq, dk, dv vs the oracle shard, fwd log, bwd log)."""
    from lasp import ring_linear_attention
    from lasp.parallel import count_collectives, shard
    r, T = dist.get_rank(), C * W
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=g, dtype=torch.float64) for d in (D_K, D_K, D_V))
    do = torch.randn(B, T, H, D_V, generator=g, dtype=torch.float64)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = linear_attention_dense(*full, log_decay, causal)
    ref_grads = torch.autograd.grad(ref, full, do)
    local = [shard(x, "contiguous", r, W).to(dtype).requires_grad_() for x in (q, k, v)]
    ld = None if log_decay is None else log_decay.to(dtype)
    with count_collectives() as fwd:
        o = ring_linear_attention(*local, log_decay=ld, causal=causal)
    with count_collectives() as bwd:
        grads = torch.autograd.grad(o, local, shard(do, "contiguous", r, W).to(dtype))
    errors = [rel_err(o, shard(ref, "contiguous", r, W))]
    errors += [rel_err(a, shard(b, "contiguous", r, W)) for a, b in zip(grads, ref_grads)]
    return errors, fwd.summary(), bwd.summary()


def _all_cases(W):
    out = []
    for dtype in (torch.float64, torch.float32):
        for causal, decay in ((True, None), (True, DECAY), (False, None)):
            out.append(((causal, decay is not None, dtype), *_case(W, causal, decay, dtype)))
    return out


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_ring_linear_matches_float64_oracle(W):
    """Output and every gradient within 1e-10 in float64; exchanges: W−1 K|V forward, W−1 K|V + W dK|dV back."""
    C = 7
    for rank, results in enumerate(run_ranks(W, _all_cases, W)):
        for (causal, decay, dtype), errors, fwd, bwd in results:
            assert max(errors) < TOL[dtype], f"W={W} rank {rank} causal={causal} decay={decay} {dtype}: {errors}"
            itemsize = torch.finfo(dtype).bits // 8
            block = B * C * H * (D_K + D_V) * itemsize          # K|V in the input dtype; dK|dV in the same here
            hops = {} if W == 1 else {"send": (W - 1, 0), "recv": (W - 1, (W - 1) * block)}
            assert fwd == hops, (W, rank, fwd)
            back = {} if W == 1 else {"send": (2 * W - 1, 0), "recv": (2 * W - 1, (2 * W - 1) * block)}
            assert bwd == back, (W, rank, bwd)


def _positions_matter(W):
    """A pure-decay probe: with q = k = v = 1 the output at position i is Σ_{j≤i} λ^{i−j}, which only global
    positions give (block-local positions would restart the sum at every rank boundary)."""
    from lasp import ring_linear_attention
    C, r = 5, dist.get_rank()
    ones = torch.ones(1, C, 1, 1, dtype=torch.float64)
    lam = 0.9
    o = ring_linear_attention(ones, ones, ones, log_decay=torch.tensor([lam], dtype=torch.float64).log())
    i = torch.arange(r * C, (r + 1) * C, dtype=torch.float64)
    return rel_err(o[0, :, 0, 0], (1 - lam ** (i + 1)) / (1 - lam))


def test_ring_linear_uses_global_positions():
    assert max(run_ranks(3, _positions_matter, 3)) < 1e-12


def test_ring_linear_rejects_bad_input_before_communicating():
    from lasp import ring_linear_attention
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="log_decay"):
        ring_linear_attention(q, q, q, log_decay=torch.tensor([0.1, -0.1]))
    with pytest.raises(ValueError, match="causal"):
        ring_linear_attention(q, q, q, log_decay=torch.tensor([-0.1, -0.1]), causal=False)
