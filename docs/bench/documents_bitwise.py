"""segment_ids=None is bitwise the old kernel: OLD (git rev 03b4e0a) and NEW kernels/linear_attn.py on the same inputs,
chunked fwd+bwd and the four deferred parts, with and without decay and gates. Run from the repo root:
    PYTHONPATH=$PWD python docs/bench/documents_bitwise.py
"""
import sys, torch
sys.path.insert(0, "docs/bench")
from documents import load_old
from lasp.kernels import linear_attn as new
old = load_old("03b4e0a")
torch.manual_seed(0)
ok = True
for T, gated, ld in [(300, False, True), (1000, True, True), (129, False, False), (77, True, False)]:
    B, H, d = 2, 3, 8
    q, k, v, do = (torch.randn(B, T, H, d) for _ in range(4))
    log_decay = -torch.rand(H) if ld else None
    g = -torch.rand(B, T, H) if gated else None
    outs = []
    for m in (old, new):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([g.clone().requires_grad_()] if gated else [])
        o, f = m.linear_attn_chunked(*leaves[:3], log_decay, chunk_len=16, block_chunks=4, log_gate=leaves[3] if gated else None)
        grads = torch.autograd.grad([o], leaves, [do])
        st, entries = m.deferred_states(k, v, log_decay, g, 16, 4)
        o2, cps = m.deferred_outputs(q, k, v, log_decay, g, entries, lambda w: f * 0.5 if w else None, 16, 4)
        ds, dP = m.deferred_state_grads(q, do, log_decay, g, 16, 4)
        gg = m.deferred_grads(q, k, v, do, log_decay, g, cps, dP, lambda w: f * 0.3 if w else None, 16, 4)
        outs.append([o, f, *grads, st, o2, ds, *[x for x in gg if x is not None]])
    same = all(torch.equal(a, b) for a, b in zip(*outs))
    ok &= same
    print(T, gated, ld, "bitwise equal:", same)
print("ALL", ok)
