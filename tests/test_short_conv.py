"""Short convolution (issue 26): the single-process op (kernels/short_conv.py) and its naive twin against a dense
float64 definition and fla's Conv1d convention, decoding from its cache, the sequence-parallel halo exchange at
W = 1..4 in both layouts (outputs, gradients of input and weight, documents across rank edges, the messages
counted), bad input, and a Linear-Llama3 with short_conv = 4 under sequence parallelism against one process."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lasp import models
from lasp.apply import apply_sequence_parallel
from lasp.models import LinearLlamaConfig
from lasp.kernels.short_conv import short_conv_naive
from lasp.models.common import ShortConvolution, short_conv
from lasp.parallel import comm, layout as layouts
from lasp.parallel.short_conv import sequence_parallel_short_conv
from tests.dist import rel_err, run_ranks

B, T, FEAT, WIDTH = 2, 48, 5, 4


def _dense_conv(x, weight, activation, segment_ids=None, halo=None, halo_ids=None):
    """Float64 definition: y_t = act(Σ_j M[t, j] x_j) over [halo | x], M[t, j] = W[f, 0, j − t + h] for
    0 ≤ t − j ≤ h and j in t's document; one (T + h)² matrix per channel (obviously right, slow)."""
    Bx, Tx, Fx = x.shape
    w = weight.shape[-1]
    h = w - 1
    xe = torch.cat([torch.zeros(Bx, h, Fx, dtype=x.dtype) if halo is None else halo, x], dim=1)
    n = Tx + h
    lag = torch.arange(n)[:, None] - torch.arange(n)[None, :]                # t − j
    taps = weight[:, 0, (h - lag).clamp(0, h)]                               # (F, n, n)
    band = ((lag >= 0) & (lag <= h)).to(x.dtype)
    if segment_ids is None:
        same = torch.ones(Bx, n, n, dtype=x.dtype)
    else:
        first = segment_ids[:, :1].expand(Bx, h) if halo_ids is None else halo_ids
        ids = torch.cat([first, segment_ids], dim=1)
        same = (ids[:, :, None] == ids[:, None, :]).to(x.dtype)
    y = torch.einsum("fij,bij,bjf->bif", taps * band, same, xe)[:, h:]
    return F.silu(y) if activation else y


def _documents(length):
    """(B, length) ids: row 0 has a 1-token document at 12, a boundary at 24 (a rank edge for W = 2, 4 and the
    zigzag sub-chunks) and one at 31; row 1 one boundary at 6 (a zigzag sub-chunk edge at W = 4)."""
    t = torch.arange(length)
    return torch.stack([(t >= 12).long() + (t >= 13).long() + (t >= 24).long() + (t >= 31).long(),
                        (t >= 6).long()])


def _data(seed=0, width=WIDTH):
    g = torch.Generator().manual_seed(seed)
    x, dy = (torch.randn(B, T, FEAT, generator=g, dtype=torch.float64) for _ in range(2))
    return x, torch.randn(FEAT, 1, width, generator=g, dtype=torch.float64), dy


# ---------------------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("op", [short_conv, short_conv_naive], ids=["op", "naive"])
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("activation", [False, True])
def test_short_conv_matches_dense_definition(op, width, documents, activation):
    """Output and gradients of x, weight and halo, with a halo whose ids straddle a boundary."""
    x, weight, dy = _data(width=width)
    g = torch.Generator().manual_seed(5)
    halo = torch.randn(B, width - 1, FEAT, generator=g, dtype=torch.float64)
    ids = _documents(T) + 1 if documents else None
    halo_ids = torch.tensor([[0] * (width - 1), [0] * (width - 2) + [1] if width > 1 else []]).long()
    halo_ids = halo_ids if documents else None
    leaves = [t.clone().requires_grad_() for t in (x, weight, halo)]
    y = op(*leaves[:2], activation=activation, segment_ids=ids, halo=leaves[2], halo_segment_ids=halo_ids)
    y.backward(dy)
    refs = [t.clone().requires_grad_() for t in (x, weight, halo)]
    y_ref = _dense_conv(refs[0], refs[1], activation, ids, refs[2], halo_ids)
    y_ref.backward(dy)
    assert rel_err(y, y_ref) < 1e-12
    for got, ref in zip(leaves, refs):
        if ref.numel():
            assert rel_err(got.grad, ref.grad) < 1e-12


def test_short_conv_is_fla_conv1d_convention():
    """No documents, no halo: SiLU(depthwise Conv1d, padding w − 1, no bias, first T outputs), weight (C, 1, w)."""
    x, weight, _ = _data()
    conv = F.conv1d(x.transpose(1, 2), weight, padding=WIDTH - 1, groups=FEAT)[..., :T].transpose(1, 2)
    assert rel_err(short_conv(x, weight), F.silu(conv)) < 1e-13


def test_short_convolution_decodes_from_its_cache():
    """A prefill of 5 tokens then one token at a time equals one call over all tokens."""
    torch.manual_seed(0)
    conv = ShortConvolution(FEAT, WIDTH).double()
    conv.init_weights()
    x, _, _ = _data()
    cache = {}
    steps = [conv(x[:, :2], cache=cache)] + [conv(x[:, t:t + 1], cache=cache) for t in range(2, T)]
    assert rel_err(torch.cat(steps, dim=1), conv(x)) < 1e-14
    assert cache["conv"].shape == (B, WIDTH - 1, FEAT) and torch.equal(cache["conv"], x[:, -(WIDTH - 1):])


# ---------------------------------------------------------------------------------------------- sequence parallel
def _expected_messages(layout, rank, world, documents):
    """(sends, recvs, bytes received) of one forward + backward: a halo from another rank is one message each way
    (its document ids ride in the forward one)."""
    segments = layouts.segment_indices(layout, rank, world)
    owner = {g: r for r in range(world) for g in layouts.segment_indices(layout, r, world)}
    remote_in = sum(g > 0 and owner[g - 1] != rank for g in segments)           # halos this rank receives
    remote_out = sum(g + 1 in owner and owner[g + 1] != rank for g in segments)  # tails it sends
    halo = (WIDTH - 1) * B * FEAT * 8
    received = remote_in * (halo + ((WIDTH - 1) * B * 8 if documents else 0)) + remote_out * halo
    return remote_out + remote_in, remote_in + remote_out, received


def _rank_sp_cases(cases, x, weight, dy, drop_halo):
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for layout, documents, activation in cases:
        xl = layouts.shard(x, layout, rank, world).clone().requires_grad_()
        wl = weight.clone().requires_grad_()
        ids = layouts.shard(_documents(T), layout, rank, world) if documents else None
        with comm.count_collectives() as log:
            if drop_halo:                                      # what a broken exchange would compute
                c = layouts.check_local_len(xl.shape[1], layout)
                y = torch.cat([short_conv(s, wl, activation=activation, segment_ids=None if i is None else i)
                               for s, i in zip(xl.split(c, 1), [None] * 2 if ids is None else ids.split(c, 1))], 1)
            else:
                y = sequence_parallel_short_conv(xl, wl, activation=activation, segment_ids=ids, layout=layout)
            y.backward(layouts.shard(dy, layout, rank, world))
        dw = comm.all_reduce(wl.grad.clone())
        expected = _expected_messages(layout, rank, world, documents)
        out.append((y.detach().numpy(), xl.grad.numpy(), dw.numpy(),
                    (log.count("send"), log.count("recv"), log.bytes("recv"), log.count()), expected))
    return out


SP_CASES = [(layout, documents, activation) for layout in layouts.LAYOUTS for documents in (False, True)
            for activation in (True,)] + [("zigzag", True, False)]


def _sp_check(world, drop_halo=False):
    x, weight, dy = _data(1)
    per_rank = run_ranks(world, _rank_sp_cases, SP_CASES, x, weight, dy, drop_halo)
    errors = []
    for i, (layout, documents, activation) in enumerate(SP_CASES):
        leaves = [t.clone().requires_grad_() for t in (x, weight)]
        ref = short_conv_naive(*leaves, activation=activation, segment_ids=_documents(T) if documents else None)
        ref.backward(dy)
        results = [r[i] for r in per_rank]
        y = layouts.unshard([torch.from_numpy(r[0]) for r in results], layout)
        dx = layouts.unshard([torch.from_numpy(r[1]) for r in results], layout)
        errors.append((rel_err(y, ref), rel_err(dx, leaves[0].grad), rel_err(torch.from_numpy(results[0][2]),
                                                                             leaves[1].grad)))
        if not drop_halo:                                       # only the halo messages, exactly these
            for r, (*_, counted, expected) in enumerate(results):
                assert counted == (*expected, expected[0] + expected[1]), (layout, documents, r, counted, expected)
    return errors


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_sequence_parallel_short_conv_matches_one_process(world):
    """Both layouts, with and without documents (a 1-token document, boundaries on rank and sub-chunk edges):
    output, dx (the halo owners' included) and dW summed over ranks, 1e-10 in float64; the messages counted.
    W = 8 zigzag: sub-chunks of exactly w − 1 = 3 tokens, the shortest allowed (a halo is a whole sub-chunk)."""
    for layout_case, errs in zip(SP_CASES, _sp_check(world)):
        assert max(errs) < 1e-10, (world, layout_case, errs)


def test_dropping_the_halo_is_caught():
    """The same comparison with every segment convolved alone (halo zeros) fails: the halo is what is tested."""
    errs = _sp_check(4, drop_halo=True)
    assert all(e[0] > 1e-3 and e[1] > 1e-3 for e in errs), errs


def test_bad_input_names_short_conv_and_the_segment_length():
    x, weight, _ = _data()
    with pytest.raises(ValueError, match=r"short_conv: width 4 needs segments of at least 3 .* segment length 2"):
        sequence_parallel_short_conv(x[:, :4], weight, layout="zigzag")
    with pytest.raises(ValueError, match=r"short_conv: segment_ids must be an integer \(B, C\) = \(2, 48\)"):
        sequence_parallel_short_conv(x, weight, segment_ids=torch.zeros(2, 47, dtype=torch.long))
    with pytest.raises(ValueError, match=r"short_conv: x must be \(B, C, F\) and weight \(F, 1, w\)"):
        sequence_parallel_short_conv(x, weight[:3])
    with pytest.raises(ValueError, match=r"short_conv must be >= 0 .* got -1"):
        LinearLlamaConfig(short_conv=-1)


# ---------------------------------------------------------------------------------------------- the model
CONV_MODEL = LinearLlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, pattern="LN",
                               short_conv=WIDTH)


def _model_loss_grads(model, tokens, positions, segment_ids, reduce):
    hidden = model(tokens, positions, segment_ids)
    loss_sum, count = model.loss(hidden, (tokens * 7 + 3) % 61, None)          # any labels made token by token
    loss_sum.backward()
    total = reduce(torch.stack([loss_sum.detach(), count.double()]))
    grads = {n: reduce(p.grad.detach().clone()).numpy() for n, p in model.named_parameters()}
    return (total[0] / total[1]).item(), grads


def _rank_model(model, tokens, segment_ids):
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for layout in layouts.LAYOUTS:
        sp = apply_sequence_parallel(copy.deepcopy(model), layout=layout)
        shard = [layouts.shard(t, layout, rank, world) for t in (tokens, segment_ids)]
        out.append(_model_loss_grads(sp, shard[0], layouts.local_positions(T, layout, rank, world), shard[1],
                                     comm.all_reduce))
    return out


def test_model_with_short_conv_under_sequence_parallelism():
    """LinearLlama (LN, short_conv 4) at W = 4, both layouts, packed documents: loss and every gradient 1e-10."""
    torch.manual_seed(0)
    model = models.build_model(CONV_MODEL).double()
    tokens = torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(2))
    ref_loss, ref_grads = _model_loss_grads(copy.deepcopy(model), tokens, torch.arange(T), _documents(T), lambda g: g)
    for loss, grads in run_ranks(4, _rank_model, model, tokens, _documents(T))[0]:
        assert abs(loss - ref_loss) < 1e-10 * abs(ref_loss)
        for name, ref in ref_grads.items():
            assert rel_err(torch.from_numpy(grads[name]), torch.from_numpy(ref)) < 1e-10, name
    assert any("qkv_conv" in n for n in ref_grads) and all(abs(g).sum() > 0 for g in ref_grads.values())


def test_old_model_files_load_without_short_conv():
    """A model file written before the field (tests/data, the former bam family) loads with short_conv = 0."""
    model = models.load_model(os.path.join(os.path.dirname(__file__), "data", "bam-family-seed.pt"))
    assert model.config.short_conv == 0 and not any("conv" in n for n, _ in model.named_parameters())


def test_launcher_refuses_a_halo_longer_than_a_segment_before_any_group():
    """seq_len / (sp · segments) < w − 1: one message naming model.short_conv, from the config check (no process
    group needed), for Linear-Llama3's short_conv and Qwen3-Next's conv_width alike."""
    from lasp.launch.config import config_errors, parse_args
    for flags in (("--model.short_conv", "4"), ("--model", "qwen3-next-tiny")):
        cfg, _ = parse_args(["--sp", "8", "--parallel.layout", "zigzag", "--data.seq_len", "32", *flags])
        errors = config_errors(cfg, 8)
        assert any("needs segments of at least 3 tokens" in e and "got 2" in e for e in errors), errors
        cfg, _ = parse_args(["--sp", "8", "--parallel.layout", "zigzag", "--data.seq_len", "48", *flags])
        assert not [e for e in config_errors(cfg, 8) if "segments of at least" in e]
