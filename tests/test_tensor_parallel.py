"""Tensor parallelism: TP = 2, TP 2 x SP 2 and TP 2 x SP 2 x DP 2 equal one process; collectives per block; sequence-
parallel traffic halves at TP = 2; a checkpoint saved at TP = 2 resumes at TP = 1; megatron-core's layers agree with
ours; bad sizes raise before any collective.

Everything distributed runs in ONE call of run_ranks on 8 gloo ranks, which builds three meshes (dp × sp × tp =
4×1×2, 2×2×2, 4×2×1) and returns small numpy results; the parent compares them with the plain float32 model on
one process (1e-5 relative, gradients gathered from the shards).
"""
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.distributed as dist

with warnings.catch_warnings():        # imported before the ranks fork, so that they share it (seconds each)
    warnings.simplefilter("ignore")
    from megatron.core import tensor_parallel as megatron_tp
    from megatron.core.model_parallel_config import ModelParallelConfig

from lasp import models
from lasp.launch.config import check_config, parse_args
from lasp.launch.trainer import mesh_table, train
from lasp.apply import apply_sequence_parallel
from lasp.models import LinearLlamaConfig, TNLConfig
from lasp.models.common import SwiGLU
from lasp.parallel import apply_global_router_counts, comm, count_collectives, layout as layouts, mesh as meshes, tensor
from tests.dist import rel_err, run_ranks

W, B, T, V = 8, 4, 32, 101             # V = 101 is padded to 102 at tp = 2
TOL = 1e-5
FAMILIES = {
    "hybrid": LinearLlamaConfig(vocab_size=V, dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=96, pattern="LLLN",
                                linear_decay="lightning", loss_chunk_tokens=40),
    "tnl": TNLConfig(vocab_size=V, dim=64, n_layers=3, n_heads=4, glu_dim=96, loss_chunk_tokens=40),
}
CONFIGS = ("tp2", "tp2-sp2", "tp2-sp2-dp2")
TRAFFIC_ENGINES = (("lasp2", "allgather"), ("lasp1", "ring"))
CLIP = 0.5


def _batches(n):
    """n batches of (B, T) tokens, labels (some ignored), loss mask and documents, from one seed."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        labels = torch.randint(0, V, (B, T), generator=g)
        labels[0, 5] = labels[3, 30] = -100
        out.append({"tokens": torch.randint(0, V, (B, T), generator=g), "labels": labels,
                    "loss_mask": torch.rand(B, T, generator=g) > 0.2,
                    "segment_ids": (torch.arange(T) >= 13).long().expand(B, T).contiguous()})
    return out


def _model(family):
    torch.manual_seed(0)
    return models.build_model(FAMILIES[family])


def _loss_sum(model, batch, positions):
    hidden = model(batch["tokens"], positions, batch["segment_ids"])
    return model.loss(hidden, batch["labels"], batch["loss_mask"])


def _numpy(tensors):
    """Copies: the queue must not see tensors (shared-memory handles that die with the rank) nor later edits."""
    return {k: v.detach().clone().numpy() for k, v in tensors.items()}


# --------------------------------------------------------------------------------------------- on the ranks
def _equivalence(family, mesh, batch, split_dp):
    """Loss sum, count and full gradients of one replica (dp index 0) and of the whole job."""
    model = _model(family)
    apply_sequence_parallel(model, group=mesh.group("sp"))
    tensor.apply_tensor_parallel(model, mesh)
    dp_rank, sp_rank = mesh.rank_in("dp"), mesh.rank_in("sp")
    if split_dp:
        batch = {k: v.chunk(mesh.dp)[dp_rank] for k, v in batch.items()}
    batch = {k: layouts.shard(v, "contiguous", sp_rank, mesh.sp) for k, v in batch.items()}
    loss_sum, count = _loss_sum(model, batch, layouts.local_positions(T, "contiguous", sp_rank, mesh.sp))
    loss_sum.backward()
    totals = comm.all_reduce(torch.stack([loss_sum.detach(), count.float()]), mesh.group("sp"))
    grads = {n: comm.all_reduce(p.grad.clone(), mesh.group("sp")) for n, p in model.named_parameters()}
    grads = {n: model.tensor_parallel.unshard(n, g) for n, g in grads.items()}     # gathered over tp
    replica = (totals.tolist(), _numpy(grads))
    totals = comm.all_reduce(totals.clone(), mesh.group("dp"))
    job = (totals.tolist(), _numpy({n: comm.all_reduce(g.clone(), mesh.group("dp")) for n, g in grads.items()}))
    return replica, job


def _block_collectives(family, mesh):
    """{layer index: (forward, backward) {op: (calls, bytes)}} of each block run alone (sp = 1: all TP)."""
    model = tensor.apply_tensor_parallel(_model(family), mesh)
    x = torch.randn(2, T, FAMILIES[family].dim, generator=torch.Generator().manual_seed(2), requires_grad=True)
    positions = torch.arange(T).expand(2, T)
    out = {}
    for i, block in enumerate(model.layers):
        with count_collectives() as fwd:
            y = block(x, positions)
        with count_collectives() as bwd:
            y.square().sum().backward()
        out[i] = (fwd.summary(), bwd.summary())
    return out


def _sp_traffic(family, mesh, engines, batch):
    """[(op, bytes)] of the sequence-parallel collectives of a forward + backward (no loss: no vocabulary traffic)."""
    model = _model(family)
    apply_sequence_parallel(model, linear=engines[0], softmax=engines[1], group=mesh.group("sp"))
    tensor.apply_tensor_parallel(model, mesh)
    sp_rank = mesh.rank_in("sp")
    tokens = layouts.shard(batch["tokens"], "contiguous", sp_rank, mesh.sp)
    with count_collectives() as log:
        model(tokens, layouts.local_positions(T, "contiguous", sp_rank, mesh.sp)).square().sum().backward()
    return [(r.op, r.bytes) for r in log.records if r.op != "all_reduce"]       # all-reduces are TP's


def _train_and_save(family, mesh, batches, folder):
    """Three AdamW steps at TP = 2 (clipped by the full-model norm); after the first, save the full model and
    optimizer state. -> (mean losses, grad norms). float64: Adam's first steps are ≈ lr·sign(g), which turns float32
    rounding in near-zero gradient entries into 1e-5 differences by the second step; this test is about resharding."""
    model = tensor.apply_tensor_parallel(_model(family).double(), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, norms = [], []
    for step, batch in enumerate(batches):
        loss_sum, count = _loss_sum(model, batch, torch.arange(T))
        (loss_sum / count).backward()
        losses.append((loss_sum / count).item())
        norms.append(tensor.clip_grad_norm_(model, CLIP))
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            state, moments = tensor.full_state_dict(model), tensor.full_optimizer_state(model, optimizer)
            if dist.get_rank() == 0:
                models.save_model(folder / f"{family}.pt", model, state_dict=state)
                torch.save(moments, folder / f"{family}-optim.pt")
    return losses, norms


def _megatron_agrees(group):
    """megatron-core's ColumnParallelLinear/RowParallelLinear (a SwiGLU) and VocabParallelEmbedding, given our
    group, against ours on the same full weights: outputs and input gradients -> max relative error."""
    config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True,
                                 perform_initialization=False)
    torch.manual_seed(3)
    mlp, table = SwiGLU(16, 24), torch.randn(11, 16)                   # nn.Linear's own initialisation
    full = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    cols = {n: megatron_tp.ColumnParallelLinear(16, 24, config=config, init_method=None, bias=False, tp_group=group)
            for n in ("gate_proj", "up_proj")}
    row = megatron_tp.RowParallelLinear(24, 16, config=config, init_method=None, bias=False, input_is_parallel=True,
                                        skip_bias_add=False, tp_group=group)
    embed = megatron_tp.VocabParallelEmbedding(12, 16, init_method=None, config=config, tp_group=group)
    tensor.apply_tensor_parallel(mlp, group)
    with torch.no_grad():                      # megatron's shards from our Shard rules: checks the layouts too
        for n, layer in cols.items():
            layer.weight.copy_(tensor.Shard(0).split(full[f"{n}.weight"], comm.group_rank(group), 2))
        row.weight.copy_(tensor.Shard(1).split(full["down_proj.weight"], comm.group_rank(group), 2))
        embed.weight.copy_(tensor.Shard(0, vocab=11).split(table, comm.group_rank(group), 2))
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    ours = mlp(x)
    (dx_ours,) = torch.autograd.grad(ours.square().sum(), x)
    theirs = row(torch.nn.functional.silu(cols["gate_proj"](x)[0]) * cols["up_proj"](x)[0])[0]
    (dx_theirs,) = torch.autograd.grad(theirs.square().sum(), x)
    tokens = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(5))
    ours_embed = tensor.VocabParallelEmbedding(embed.weight, 6 * comm.group_rank(group), group)(tokens)
    return max(rel_err(ours, theirs), rel_err(dx_ours, dx_theirs), rel_err(ours_embed, embed(tokens)),
               rel_err(ours_embed, table[tokens]))


def _bad_heads(mesh):
    """An odd head count at tp = 2: every rank raises the same ValueError before any collective."""
    model = models.build_model(LinearLlamaConfig(vocab_size=V, dim=48, n_layers=1, n_heads=3, n_kv_heads=1,
                                                 ffn_dim=64))
    before = {n: p.shape for n, p in model.named_parameters()}
    with count_collectives() as log:
        try:
            tensor.apply_tensor_parallel(model, mesh)
            error = None
        except ValueError as e:
            error = str(e)
    return error, len(log.records), before == {n: p.shape for n, p in model.named_parameters()}


def _rank_main(folder):
    rank = dist.get_rank()
    tp_only, tp_sp, sp_only = (meshes.build_mesh(rank, W, sp=sp, tp=tp) for sp, tp in ((1, 2), (2, 2), (2, 1)))
    batches = _batches(3)
    out = {"megatron": _megatron_agrees(tp_only.group("tp")), "bad_heads": _bad_heads(tp_only)}
    for family in FAMILIES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out[family, "tp2"] = _equivalence(family, tp_only, batches[0], split_dp=False)[0]
        out[family, "warnings"] = [str(w.message) for w in caught]
        out[family, "tp2-sp2"], out[family, "tp2-sp2-dp2"] = _equivalence(family, tp_sp, batches[0], split_dp=True)
        out[family, "blocks"] = _block_collectives(family, tp_only)
        for engines in TRAFFIC_ENGINES:
            out[family, engines] = [_sp_traffic(family, m, engines, batches[0]) for m in (sp_only, tp_sp)]
        out[family, "train"] = _train_and_save(family, tp_only, batches, folder)
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp")
    return run_ranks(W, _rank_main, folder)[0], folder


# --------------------------------------------------------------------------------------------- in the parent
def _reference(family, batch):
    model = _model(family)
    loss_sum, count = _loss_sum(model, batch, torch.arange(T))
    loss_sum.backward()
    return loss_sum.item() / count.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_matches_one_process(family, config, ranks):
    batch = _batches(1)[0]
    if config == "tp2-sp2":                                    # one replica: the first half of the batch
        batch = {k: v.chunk(2)[0] for k, v in batch.items()}
    ref_loss, ref_grads = _reference(family, batch)
    (loss_sum, count), grads = ranks[0][family, config]
    assert abs(loss_sum / count - ref_loss) <= TOL * ref_loss, (loss_sum / count, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert ref.norm() > 0, f"{name} got no gradient"
        assert grads[name].shape == tuple(ref.shape), name     # gathered to the full, unpadded shape
        err = rel_err(torch.from_numpy(grads[name]), ref)
        assert err < TOL, f"{name}: rel err {err:.2e}"


def _expected_block(kind, family):
    """(forward, backward) all-reduces per block at tp = 2, as (calls, bytes); X = bytes of (2, T, D) float32.

    Every block: g after the mixer's and the MLP's output projections (forward), f before their inputs
    (backward); an all-reduce moves 2(n−1)/n·|x| = |x| at n = 2. TNL adds Σ o² (2, T, 1) each way for its
    full-width SRMSNorm; a Linear-Llama3 linear layer adds its per-head norm weight's gradient (d floats).
    """
    cfg = FAMILIES[family]
    X = 2 * T * cfg.dim * 4
    if family == "tnl":
        return (3, 2 * X + 2 * T * 4), (3, 2 * X + 2 * T * 4)
    if kind == "L":
        return (2, 2 * X), (3, 2 * X + cfg.dim // cfg.n_heads * 4)
    return (2, 2 * X), (2, 2 * X)


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_collectives_per_block(family, ranks):
    kinds = FAMILIES[family].layer_types() if family == "hybrid" else "L" * FAMILIES[family].n_layers
    for i, (fwd, bwd) in ranks[0][family, "blocks"].items():
        expected_fwd, expected_bwd = _expected_block(kinds[i], family)
        assert set(fwd) == set(bwd) == {"all_reduce"}, (i, fwd, bwd)
        assert fwd["all_reduce"] == expected_fwd and bwd["all_reduce"] == expected_bwd, (i, kinds[i], fwd, bwd)


@pytest.mark.parametrize("engines", TRAFFIC_ENGINES, ids="-".join)
@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_parallel_traffic_halves_at_tp2(family, engines, ranks):
    """LASP-2 / LASP-1 states, gathered or ringed K/V carry the local heads only: every sequence-parallel message
    at TP = 2 is half of its TP = 1 size, but for LASP-2's header of two float32 numbers per peer."""
    at_tp1, at_tp2 = ranks[0][family, engines]
    header = 2 * 4 * (2 - 1)
    assert [op for op, _ in at_tp1] == [op for op, _ in at_tp2] and at_tp1
    assert sum(b for _, b in at_tp1) > 0
    for (op, b1), (_, b2) in zip(at_tp1, at_tp2):
        assert 2 * b2 - b1 in ((0, header) if op == "all_gather" and engines[0] == "lasp2" else (0,)), (op, b1, b2)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_saved_at_tp2_resumes_at_tp1(family, ranks):
    """The file is a plain model.pt (full, unpadded weights) plus full AdamW moments: at TP = 1 the next-step loss,
    the clipped step after it and the loss after that match the TP = 2 run (float64, see _train_and_save)."""
    (losses, norms), folder = ranks[0][family, "train"], ranks[1]
    plain = models.load_model(folder / f"{family}.pt", config=FAMILIES[family])     # a plain, one-process model
    assert plain.embed.weight.shape == (V, FAMILIES[family].dim)
    model = models.build_model(FAMILIES[family]).double()                 # load_model would round to float32
    model.load_state_dict(torch.load(folder / f"{family}.pt", weights_only=True)["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tensor.load_full_optimizer_state(model, optimizer, torch.load(folder / f"{family}-optim.pt", weights_only=True))
    resumed = []
    for step, batch in enumerate(_batches(3)[1:], start=1):
        loss_sum, count = _loss_sum(model, batch, torch.arange(T))
        (loss_sum / count).backward()
        resumed.append((loss_sum / count).item())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item()
        assert norm > CLIP and abs(norm - norms[step]) <= 1e-10 * norm, (step, norm, norms[step])  # it clipped
        optimizer.step()
        optimizer.zero_grad()
    for a, b in zip(resumed, losses[1:]):
        assert abs(a - b) <= 1e-10 * b, (resumed, losses)


def test_megatron_layers_agree_with_ours(ranks):
    assert ranks[0]["megatron"] < TOL


def test_vocabulary_is_padded_with_a_warning(ranks):
    for family in FAMILIES:
        assert any("vocab_size 101 is not a multiple of tp=2" in w and "padded to 102" in w
                   for w in ranks[0][family, "warnings"]), ranks[0][family, "warnings"]


def test_bad_sizes_raise_before_any_collective(ranks):
    error, n_collectives, unchanged = ranks[0]["bad_heads"]
    assert error is not None and "n_heads=3" in error and "tp=2" in error
    assert n_collectives == 0 and unchanged
    hybrid = models.build_model(FAMILIES["hybrid"], device="meta")
    with pytest.raises(ValueError, match=r"n_kv_heads=4 is not divisible by tp=8"):
        tensor.check_tensor_parallel(hybrid, 8)
    mlp = models.build_model(LinearLlamaConfig(dim=64, n_heads=4, n_kv_heads=2, ffn_dim=90, n_layers=1), "meta")
    with pytest.raises(ValueError, match=r"mlp.gate_proj has 90 output features, not divisible by tp=4"):
        tensor.check_tensor_parallel(mlp, 4)
    assert tensor.check_tensor_parallel(hybrid, 2) == 102 and tensor.check_tensor_parallel(hybrid, 1) == 101
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by sp=2 x tp=2 = 4"):
        meshes.build_mesh(0, 6, sp=2, tp=2)


# --------------------------------------------------------------------------------------------- the launcher
def _launch_curves(cfg):
    out = train(cfg)
    return list(out["losses"].values()), list(out["grad_norms"].values())


def test_launcher_tp2_equals_tp1_and_its_checkpoint_resumes_at_tp1(tmp_path):
    """`--tp 2` on 2 ranks follows `--tp 1` (losses and full-model grad norms), and its checkpoint, written with full
    weights, continues on one rank exactly as the uninterrupted one-rank run."""
    def tiny(run_dir, *args):
        return parse_args(["--config", "tiny", "--run-dir", str(tmp_path / run_dir), "--max-steps", "4",
                           "--data.cache_dir", str(tmp_path / "cache"), "--run.sample_tokens", "0", *args])[0]
    one = run_ranks(1, _launch_curves, tiny("tp1"))[0]
    two = run_ranks(2, _launch_curves, tiny("tp2", "--tp", "2", "--max-steps", "2"))   # within the warm-up: the
    rest = run_ranks(1, _launch_curves, tiny("tp2", "--resume"))[0]                     # lr does not see max_steps
    assert two[0] == two[1] and len(one[0]) == 4 and len(rest[0]) == 2
    for got, want in ((two[0][0] + rest[0], one[0]), (two[0][1] + rest[1], one[1])):
        assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) < TOL, (got, want)


def test_launcher_checks_tp_before_any_collective():
    cfg = parse_args(["--config", "tiny", "--sp", "2", "--tp", "2"])[0]
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by sp=2 x tp=2 = 4.*parallel.tp=2"):
        check_config(cfg, 6)
    with pytest.raises(ValueError, match=r"parallel.tp=8 does not fit .*n_heads=4 is not divisible by tp=8"):
        check_config(parse_args(["--config", "tiny", "--tp", "8"])[0], 8)
    check_config(parse_args(["--config", "tiny", "--tp", "2", "--zero", "2"])[0], 2)   # ZeRO x TP: test_compose.py
    table = "\n".join(mesh_table(8, 2, 4, tp=2))
    assert "world 8 = dp 2 x sp 2 x tp 2" in table and "tp groups: [[0, 1], [2, 3], [4, 5], [6, 7]]" in table
    assert "sp groups: [[0, 2], [1, 3], [4, 6], [5, 7]]" in table
    assert "dp groups: [[0, 4], [1, 5], [2, 6], [3, 7]]" in table


# --------------------------------------------------------------------------------------------- BAM mixtures
# One run_ranks call on 4 ranks: meshes tp = 2 (x dp 2), tp = 4 and sp 2 x tp 2. Mixture heads split per expert
# head group, FFN experts on their channels, routers replicated; every replica runs the whole batch.
BAM_CFGS = {
    "kv-experts": LinearLlamaConfig(vocab_size=V, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=96,
                                    pattern="LN", linear_decay="lightning", loss_chunk_tokens=40, parallel_block=True,
                                    n_attn_experts=2, n_ffn_experts=4, top_k=2),
    "kv-sharing": LinearLlamaConfig(vocab_size=V, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=96,
                                    pattern="NL", linear_decay="retention", loss_chunk_tokens=40, parallel_block=True,
                                    n_attn_experts=3, kv_sharing=True, n_ffn_experts=3, top_k=1),
}
BAM_MESHES = {"tp2": (1, 2), "tp4": (1, 4), "sp2-tp2": (2, 2)}      # name: (sp, tp) on 4 ranks


def _bam_model(name, dtype=torch.float32):
    torch.manual_seed(0)
    model = models.build_model(BAM_CFGS[name]).to(dtype)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.router.weight.mul_(30)      # well-separated top-k decisions: fp32 round-off flips none
    return model


def _bam_batch():
    """All labels valid, no loss mask: the router losses of sp shards then add up to the global ones exactly."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, V, (2, T), generator=g), torch.randint(0, V, (2, T), generator=g)


def _bam_step(model, tokens, labels, positions):
    loss_sum, count = model.loss(model(tokens, positions), labels)
    return loss_sum, count


def _bam_equivalence(name, mesh):
    """(loss, count) of the step and the full gradients, summed over sp, gathered over tp."""
    model = _bam_model(name)
    sp_rank = mesh.rank_in("sp")
    if mesh.sp > 1:
        apply_sequence_parallel(model, group=mesh.group("sp"))
        apply_global_router_counts(model, mesh.group("sp"))
    tensor.apply_tensor_parallel(model, mesh)
    tokens, labels = (layouts.shard(x, "contiguous", sp_rank, mesh.sp) for x in _bam_batch())
    with count_collectives() as log:
        loss_sum, count = _bam_step(model, tokens, labels, layouts.local_positions(T, "contiguous", sp_rank, mesh.sp))
        loss_sum.backward()
    totals = comm.all_reduce(torch.stack([loss_sum.detach(), count.float()]), mesh.group("sp"))
    grads = {n: comm.all_reduce(p.grad.clone(), mesh.group("sp")) for n, p in model.named_parameters()}
    grads = {n: model.tensor_parallel.unshard(n, g) for n, g in grads.items()}
    return totals.tolist(), _numpy(grads), log.summary()


def _bam_train(name, mesh, steps):
    """float64 AdamW steps (see _train_and_save) at this mesh's tp -> (losses, full state and moments after 1)."""
    model = tensor.apply_tensor_parallel(_bam_model(name, torch.float64), mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return _bam_steps(model, optimizer, steps, first=0, save=True)


def _bam_steps(model, optimizer, steps, first, save=False):
    tokens, labels = _bam_batch()
    losses, saved = [], None
    for step in range(first, steps):
        loss_sum, count = _bam_step(model, tokens, labels, torch.arange(T))
        (loss_sum / count).backward()
        losses.append((loss_sum / count).item())
        tensor.clip_grad_norm_(model, CLIP)
        optimizer.step()
        optimizer.zero_grad()
        if save and step == 0:      # copies: unsplit tensors of both are the live ones, which train on
            saved = copy.deepcopy((tensor.full_state_dict(model), tensor.full_optimizer_state(model, optimizer)))
    return losses, saved


def _bam_resume(name, mesh, saved, steps):
    """The tp = 2 run's full state after step 1 loaded at this mesh's tp -> the losses of steps 2.."""
    model = tensor.apply_tensor_parallel(_bam_model(name, torch.float64), mesh)
    tensor.load_full_state_dict(model, saved[0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tensor.load_full_optimizer_state(model, optimizer, saved[1])
    return _bam_steps(model, optimizer, steps, first=1)[0]


def _bam_rank_main():
    rank = dist.get_rank()
    built = {k: meshes.build_mesh(rank, 4, sp=sp, tp=tp) for k, (sp, tp) in BAM_MESHES.items()}
    out = {}
    for name in BAM_CFGS:
        for mesh_name, mesh in built.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                   # V = 101 padded
                out[name, mesh_name] = _bam_equivalence(name, mesh)
        losses, saved = _bam_train(name, built["tp2"], 3)
        resumed = _bam_resume(name, built["tp4"], saved, 3)
        out[name, "train"] = losses, resumed, (_numpy(saved[0]) if rank == 0 else None)
    return out


@pytest.fixture(scope="module")
def bam_ranks():
    return run_ranks(4, _bam_rank_main)


def _bam_reference(name):
    model = _bam_model(name)
    loss_sum, count = _bam_step(model, *_bam_batch(), torch.arange(T))
    loss_sum.backward()
    return loss_sum.item() / count.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mesh", BAM_MESHES)
@pytest.mark.parametrize("name", BAM_CFGS)
def test_bam_tensor_parallel_matches_one_process(name, mesh, bam_ranks):
    """Loss (router losses included) and every gradient, gathered to full shapes, equal one process (fp32)."""
    ref_loss, ref_grads = _bam_reference(name)
    for rank in range(4):
        (loss_sum, count), grads, comms = bam_ranks[rank][name, mesh]
        assert abs(loss_sum / count - ref_loss) <= TOL * ref_loss, (rank, loss_sum / count, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for pname, ref in ref_grads.items():
            assert ref.norm() > 0, f"{pname} got no gradient"
            assert grads[pname].shape == tuple(ref.shape), pname
            err = rel_err(torch.from_numpy(grads[pname]), ref)
            assert err < TOL, f"rank {rank} {pname}: rel err {err:.2e}"
    assert comms["all_reduce"][0] > 0


def test_bam_checkpoint_holds_full_weights_and_resumes_at_another_tp(bam_ranks):
    """After one step at tp = 2 the full state dict is the plain model's (shapes, loadable at tp = 1); loaded with
    the full AdamW moments at tp = 4 the next steps' losses equal the uninterrupted tp = 2 run's (float64)."""
    for name, cfg in BAM_CFGS.items():
        losses, resumed, state = bam_ranks[0][name, "train"]
        plain = models.build_model(cfg)
        assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == {k: v.shape for k, v in state.items()}
        plain.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        assert len(resumed) == 2 and all(abs(a - b) <= 1e-10 * b for a, b in zip(resumed, losses[1:])), \
            (name, resumed, losses)


def test_bam_bad_sizes_raise():
    """FFN experts' channels and the mixture's heads are checked like the dense ones, before any change."""
    cfg = BAM_CFGS["kv-experts"]
    with pytest.raises(ValueError, match=r"layers.0.mlp experts have 90 channels \(ffn_dim\), not divisible by tp=4"):
        tensor.check_tensor_parallel(models.build_model(dataclasses.replace(cfg, ffn_dim=90), "meta"), 4)
    with pytest.raises(ValueError, match=r"layers.1.mixer.n_kv_heads=4 is not divisible by tp=8"):
        tensor.check_tensor_parallel(models.build_model(cfg, "meta"), 8)
    assert tensor.check_tensor_parallel(models.build_model(cfg, "meta"), 4) == 104
