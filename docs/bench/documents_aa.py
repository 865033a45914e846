"""segment_ids=None against the old kernel with an A/A control: OLD (git rev 03b4e0a) loaded twice as two modules
and NEW, rotating within every repetition; medians of CPU and wall seconds of linear_attn_chunked fwd+bwd, fp32,
B=1, H=8, d=32, decay. old2/old shows what identical code measures as on this host at the time.
    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python docs/bench/documents_aa.py T REPS
"""
import sys, statistics, time, torch
sys.path.insert(0, "docs/bench")
from documents import inputs, kernel_step, load_old
from lasp.kernels.linear_attn import linear_attn_chunked as new
torch.set_num_threads(1)
old, old2 = load_old("03b4e0a").linear_attn_chunked, load_old("03b4e0a").linear_attn_chunked
T, reps = int(sys.argv[1]), int(sys.argv[2])
data = inputs(T)
impls = {"old": old, "old2": old2, "new": new}
t = {n: [] for n in impls}
for n, f in impls.items(): kernel_step(f, *data, None)
names = list(impls)
for r in range(reps):
    for n in names[r % 3:] + names[:r % 3]:
        t[n].append(kernel_step(impls[n], *data, None))
m = {n: statistics.median(c for _, c in x) for n, x in t.items()}
w = {n: statistics.median(c for c, _ in x) for n, x in t.items()}
print("cpu", m, "new/old", m["new"] / m["old"], "old2/old", m["old2"] / m["old"])
print("wall", w, "new/old", w["new"] / w["old"], "old2/old", w["old2"] / w["old"])
