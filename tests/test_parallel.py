"""The foundation: layouts, the mesh built from the environment, and collective accounting."""
import pytest
import torch
import torch.distributed as dist

from lasp.parallel import comm, layout, mesh
from tests.dist import run_ranks


@pytest.mark.parametrize("name", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [1, 2, 3, 4, 8])
def test_shard_unshard_round_trip(name, W):
    x = torch.arange(2 * 16 * W).view(2, 16 * W)
    shards = [layout.shard(x, name, r, W) for r in range(W)]
    assert torch.equal(layout.unshard(shards, name), x)
    positions = torch.cat([layout.local_positions(16 * W, name, r, W) for r in range(W)])
    assert sorted(positions.tolist()) == list(range(16 * W))      # a permutation: every token exactly once
    assert torch.equal(shards[0][0], x[0, positions[:16]])


def test_layout_positions():
    assert layout.local_positions(8, "zigzag", 0, 2).tolist() == [0, 1, 6, 7]
    assert layout.local_positions(8, "zigzag", 1, 2).tolist() == [2, 3, 4, 5]
    assert layout.local_positions(8, "contiguous", 1, 2).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="12.*8 equal chunks.*zigzag"):
        layout.local_positions(12, "zigzag", 0, 4)
    with pytest.raises(ValueError, match="layout must be one of"):
        layout.local_positions(8, "striped", 0, 2)
    with pytest.raises(ValueError, match="local length \\(5\\)"):
        layout.check_local_len(5, "zigzag")


def test_dist_env_torchrun_slurm_single():
    assert mesh.dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert mesh.dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}) == (5, 16, 1)
    assert mesh.dist_env({}) == (0, 1, 0)


def test_mesh_sizes_error_names_sizes():
    with pytest.raises(ValueError, match="world size 6 is not divisible by sp=4 x tp=1"):
        mesh.check_mesh_sizes(6, sp=4)
    assert mesh.check_mesh_sizes(8, sp=2, tp=2) == 2
    with pytest.raises(ValueError, match="ep=3 must divide dp x sp = 4"):
        mesh.check_mesh_sizes(8, sp=2, tp=2, ep=3)


def _mesh_members():
    m = mesh.build_mesh(dist.get_rank(), dist.get_world_size(), sp=2, tp=2, ep=4)
    out = {}
    for name in ("dp", "sp", "tp", "ep"):
        x = torch.tensor([dist.get_rank()])
        out[name] = comm.all_gather(x, m.group(name)).tolist()
    out["idx"] = (m.rank_in("dp"), m.rank_in("sp"), m.rank_in("tp"))
    out["ep_idx"] = m.rank_in("ep")
    out["sp_group_is_default_none"] = mesh.sp_group() is m.group("sp")
    return out


def test_mesh_groups_dp_sp_tp():
    res = run_ranks(8, _mesh_members)
    assert res[5]["tp"] == [4, 5] and res[5]["sp"] == [5, 7] and res[5]["dp"] == [1, 5]
    assert res[5]["ep"] == [1, 3, 5, 7] and res[2]["ep"] == [0, 2, 4, 6]  # same tp shard, different tokens
    assert res[5]["idx"] == (1, 0, 1) and [r["ep_idx"] for r in res] == [r // 2 for r in range(8)]
    assert all(r["sp_group_is_default_none"] for r in res)


def _comm_accounting():
    W = dist.get_world_size()
    x = torch.ones(6, 5, dtype=torch.float32) * (dist.get_rank() + 1)
    with comm.count_collectives() as log:
        g = comm.all_gather(x)
        rs = comm.reduce_scatter(g.clone())
        ar = comm.all_reduce(x.clone())
        a2a = comm.all_to_all(torch.arange(W * 2, dtype=torch.float32) + 100 * dist.get_rank())
    return log.summary(), g[:, 0].tolist(), rs[0, 0].item(), ar[0, 0].item(), a2a.tolist()


def test_comm_counts_and_bytes():
    W = 3
    for r, (summary, gathered, rs, ar, a2a) in enumerate(run_ranks(W, _comm_accounting)):
        assert summary == {"all_gather": (1, 2 * 120), "reduce_scatter": (1, 2 * 360 // 3),
                           "all_reduce": (1, 2 * 2 * 120 // 3), "all_to_all": (1, 2 * 24 // 3)}
        assert gathered == [1.0] * 6 + [2.0] * 6 + [3.0] * 6
        assert rs == W * (r + 1) and ar == 6.0
        assert a2a == [float(100 * i + 2 * r + j) for i in range(W) for j in range(2)]  # block i came from rank i


def test_single_process_collectives_are_counted():
    with comm.count_collectives() as log:
        y = comm.all_gather(torch.ones(2, 3))
    assert log.summary() == {"all_gather": (1, 0)} and y.shape == (2, 3)
