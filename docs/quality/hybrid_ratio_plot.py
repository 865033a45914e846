"""Table + plot of docs/quality/hybrid_ratio.sh: python docs/quality/hybrid_ratio_plot.py IN.json OUT.json OUT.png STEPS."""
import json, sys
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
src, out_json, out_png, steps = sys.argv[1:]
d = json.load(open(src))
json.dump(d, open(out_json, "w"), indent=1)
rows = sorted((r for r in d["records"] if r["sp"] == 1), key=lambda r: r["softmax_ratio"])
x = [r["softmax_ratio"] for r in rows]; m = [r["mean"] for r in rows]
lo = [r["mean"] - min(r["heldout_loss"]) for r in rows]; hi = [max(r["heldout_loss"]) - r["mean"] for r in rows]
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.errorbar(x, m, yerr=[lo, hi], marker="o", capsize=3, label="SP = 1, seeds 0-1 (mean, min-max)")
for r in d["records"]:
    if r["sp"] != 1:
        ax.plot([r["softmax_ratio"]], r["heldout_loss"], "s", color="C3", label=f"SP = {r['sp']}, seed 0")
ax.set(xlabel="softmax layers / all layers", ylabel="held-out loss (nats)", xticks=x,
       title=f"Hybrid ratio, 8 layers x width 64, {steps} steps")
ax.set_xticklabels(["0", "1/8", "1/4", "1/2", "1"])
ax.legend(fontsize=8); fig.tight_layout(); fig.savefig(out_png, dpi=120)
for r in sorted(d["records"], key=lambda r: (r["softmax_ratio"], r["sp"])):
    print(f"| {r['pattern']} | {r['softmax_ratio']:.3f} | {r['sp']} | " + ", ".join(f"{v:.4f}" for v in r["heldout_loss"])
          + f" | {r['mean']:.4f} | {r['spread']:.4f} |")
