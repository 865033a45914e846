"""Reports of launch/bench.py: merge records into <out>.json, write <out>.md tables and the <out>.png plot.

    python launch/bench_report.py docs/bench/layer      # rewrite layer.md and layer.png from layer.json

A record is one (mode, engine, W, T, shape, device) measurement; see launch/bench.py for its fields. Long-mode
records also give the least-squares line of the step peak per rank against tokens per rank.
"""
import json
import os
import sys


import torch

from lasp import ENGINES

MiB = 2 ** 20


def _key(rec):
    return json.dumps([rec["mode"], rec["engine"], rec["world"], rec["seq_len"], rec["shape"],
                       rec.get("device", "")], sort_keys=True)


def merge_records(path, new, machine):
    """Records already in `path` with other keys are kept; the machine block is per device kind."""
    data = json.load(open(path)) if os.path.exists(path) else {"machines": {}, "records": []}
    for rec in new:
        rec["device"] = machine["device"]
    keys = {_key(r) for r in new}
    data["records"] = [r for r in data["records"] if _key(r) not in keys] + new
    data["machines"][machine["device"]] = machine
    return data


def memory_fit(records):
    """Least squares peak = slope·tokens_per_rank + intercept over long-mode records -> dict or None.

    peak = the step's peak above the rank's memory before it (`peak_bytes`): activations, gradients, buffers.
    Not the process peak: rank 0 loads matplotlib to write the plots between steps."""
    pts = sorted((r["tokens_per_rank"], r["peak_bytes"]) for r in records if r["mode"] == "long")
    if len(pts) < 3:
        return None
    x, y = torch.tensor(pts, dtype=torch.float64).T
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    intercept = y.mean() - slope * x.mean()
    r2 = 1 - ((y - slope * x - intercept) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return dict(slope_bytes_per_token=slope.item(), intercept_bytes=intercept.item(), r2=r2.item(), points=len(pts))


def _long_rows(recs):
    rows = ["| device | engine | W | T | tokens/rank | step s (fwd / bwd / opt) | tokens/s | collectives | MiB received"
            "/rank | step peak MiB/rank | process peak MiB/rank | runtime MiB | load avg 1 min (start → end) |",
            "|" + "---|" * 13]
    for r in recs:
        ph = r["phases_s"]
        rows.append(f"| {r['device']} | {r['engine']} | {r['world']} | {r['seq_len']:,} | {r['tokens_per_rank']:,} "
                    f"| {r['median_s']:.1f} ({ph['forward']:.1f} / {ph['backward']:.1f} / {ph['optimizer']:.2f}) "
                    f"| {r['tokens_per_s']:,.0f} | {r['calls']} | {r['bytes_per_rank'] / MiB:.3f} "
                    f"| {r['peak_bytes'] / MiB:,.0f} | {r['peak_abs_bytes'] / MiB:,.0f} "
                    f"| {r['runtime_bytes'] / MiB:,.0f} | {r['load_avg_start'][0]:.1f} → {r['load_avg_end'][0]:.1f} |")
    return rows


def _config(shape):
    """A record's shape in a few words: the preset and its overrides (model), or heads and dims (layer)."""
    if "preset" in shape:
        return shape["preset"] + _short(json.dumps(shape)) + (", ckpt" if shape.get("checkpoint") else "")
    return f"H={shape['heads']}/{shape['kv_heads']} d={shape['head_dim']} {shape['dtype']}"


def _rows(recs):
    rows = ["| device | config | engine | W | T | tokens/rank | median s | tokens/s | collectives | MiB received/rank "
            "| peak MiB/rank (step) | peak MiB/rank (process) |", "|" + "---|" * 12]
    for r in recs:
        rows.append(f"| {r['device']} | {_config(r['shape'])} | {r['engine']} | {r['world']} | {r['seq_len']:,} "
                    f"| {r['tokens_per_rank']:,} "
                    f"| {r['median_s']:.4g} | {r['tokens_per_s']:,.0f} | {r['calls']} "
                    f"| {r['bytes_per_rank'] / MiB:.3f} | {r['peak_bytes'] / MiB:,.1f} "
                    f"| {r['peak_abs_bytes'] / MiB:,.1f} |")
    return rows


PAPER_LASP2_OVER_LASP1 = 1 / 1.152   # LASP-2 paper: +15.2% throughput over LASP-1 (2048K tokens, 64 GPUs)
ZECO_OVER_BEST = 1 / 1.6             # ZeCO: 60% faster than the previous best SP (8M tokens, 256 GPUs)


def _network_rows(recs):
    """Per (device, config, W, T, network): the engines' times and the ratios the papers report."""
    groups = {}
    for r in recs:
        key = (r["device"], _config(r["shape"]), r["world"], r["seq_len"], r["shape"]["network"])
        groups.setdefault(key, {})[r["engine"]] = r
    rows = ["| device | config | W | T | network (model) | " + " | ".join(f"{e} s" for e in _NET_ENGINES) +
            " | LASP-2 / LASP-1 (paper 0.868) | All-Scan / LASP-2 (ZeCO 0.625) | All-Scan / LASP-1 "
            "| gather hidden | MiB recv/rank lasp2 / allscan | load (start → end) |",
            "|" + "---|" * (11 + len(_NET_ENGINES))]

    def ratio(a, b, by):
        return f"{by[a]['median_s'] / by[b]['median_s']:.3f}" if a in by and b in by else "–"
    for (device, config, W, T, net), by in sorted(groups.items(), key=lambda kv: (kv[0][:4], _net_order(kv[1]))):
        times = " | ".join(f"{by[e]['median_s']:.4g}" if e in by else "–" for e in _NET_ENGINES)
        hidden = next((r["hidden"] for r in by.values() if "hidden" in r), None)   # overlapping engines
        mib = "/".join(f"{by[e]['bytes_per_rank'] / MiB:.3f}" if e in by else "–" for e in ("lasp2", "allscan"))
        load = next(iter(by.values()))
        rows.append(f"| {device} | {config} | {W} | {T:,} | {net} | {times} | {ratio('lasp2', 'lasp1', by)} "
                    f"| {ratio('allscan', 'lasp2', by)} | {ratio('allscan', 'lasp1', by)} "
                    f"| {'–' if hidden is None else f'{hidden:.0%}'} | {mib} "
                    f"| {load['load_avg_start'][0]:.1f} → {load['load_avg_end'][0]:.1f} |")
    return rows


_NET_ENGINES = tuple(name for name, spec in ENGINES.items() if spec.kind == "linear")   # declaration order


def _net_order(by):
    """(latency s, Gbit/s) of a record or of {engine: record} of one network; inf bandwidth when unlimited."""
    r = by if "latency_s" in by else next(iter(by.values()))
    return r["latency_s"], float("inf") if r["gbps"] is None else r["gbps"]


def markdown(data):
    lines = []
    if any(r["mode"] == "network" for r in data["records"]):
        lines += ["### network (modelled interconnect)", ""] + _network_rows(
            [r for r in data["records"] if r["mode"] == "network"]) + [""]
    for mode in ("layer", "model", "long"):
        recs = sorted((r for r in data["records"] if r["mode"] == mode),
                      key=lambda r: (r["device"], _config(r["shape"]), r["world"], r["seq_len"], r["engine"]))
        if recs:
            lines += [f"### {mode}", ""] + (_long_rows(recs) if mode == "long" else _rows(recs)) + [""]
    fit = memory_fit(data["records"])
    if fit:
        lines.append(f"Step peak per rank (above the memory before the step) = {fit['slope_bytes_per_token']:,.0f} "
                     f"B/token × tokens/rank {fit['intercept_bytes'] / MiB:+,.1f} MiB, R² = {fit['r2']:.6f} "
                     f"({fit['points']} points)")
    return "\n".join(lines) + "\n"


def _short(shape_json):
    """The model overrides of a record's shape, for a legend ('' for layer records and the plain preset)."""
    overrides = json.loads(shape_json).get("overrides") or {}
    return "".join(f", {k}={v}" for k, v in overrides.items())


def plot(data, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    long = [r for r in data["records"] if r["mode"] == "long"]
    network = [r for r in data["records"] if r["mode"] == "network"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if network:
        _plot_network(ax, network)
    elif long:
        xs = sorted(r["tokens_per_rank"] for r in long)
        ax.plot(xs, [r["peak_bytes"] / MiB for r in sorted(long, key=lambda r: r["tokens_per_rank"])], "o",
                label="measured step peak (max over ranks)")
        fit = memory_fit(long)
        if fit:
            ax.plot(xs, [(fit["slope_bytes_per_token"] * x + fit["intercept_bytes"]) / MiB for x in xs], "-",
                    label=f"fit, R² = {fit['r2']:.4f}")
        ax.set(xlabel="tokens per rank", ylabel="step peak per rank above its resident memory (MiB)",
               xscale="log", yscale="log")
    else:
        series = {}
        for r in data["records"]:
            series.setdefault((r["device"], r["engine"], r["world"], json.dumps(r["shape"])), []).append(r)
        engines = sorted({key[1] for key in series})
        kinds = sorted({key[2:] for key in series})             # (W, shape): one marker and line style each
        styles = dict(zip(kinds, zip("s^oDvP", ("-", "--", ":", "-.", (0, (5, 1)), (0, (1, 3))))))
        for (device, engine, W, shape), recs in sorted(series.items()):
            recs.sort(key=lambda r: r["seq_len"])
            marker, line = styles[W, shape]
            ax.plot([r["seq_len"] for r in recs], [r["tokens_per_s"] for r in recs], marker=marker, linestyle=line,
                    color=f"C{engines.index(engine) % 10}", label=f"{engine}, W={W} ({device}{_short(shape)})")
        ax.set(xlabel="sequence length (tokens)", ylabel="tokens / s (forward + backward)", xscale="log",
               yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_network(ax, recs):
    """Step time against the swept link parameter (latency if it varies, else bandwidth), per (engine, W);
    records without a model ('off') are left out."""
    recs = [r for r in recs if r["latency_s"] > 0 or r["gbps"] is not None]
    by_latency = len({r["latency_s"] for r in recs}) > 1
    series = {}
    for r in recs:
        x = r["latency_s"] if by_latency else r["gbps"]
        other = (f"{r['gbps']:g} Gbit/s" if r["gbps"] else "unlimited") if by_latency else f"α={r['latency_s']:g} s"
        if x:
            series.setdefault((r["engine"], r["world"], r["seq_len"], other), []).append((x, r["median_s"]))
    engines = sorted({key[0] for key in series})
    worlds = sorted({key[1] for key in series})
    for (engine, W, T, other), pts in sorted(series.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="os^D"[worlds.index(W) % 4], linestyle=("-", "--", ":")[worlds.index(W) % 3],
                color=f"C{engines.index(engine) % 10}", label=f"{engine}, W={W}, T={T:,}, {other}")
    ax.set(xlabel="modelled latency per message (s)" if by_latency else "modelled link bandwidth (Gbit/s)",
           ylabel="forward + backward (s)", xscale="log", yscale="log")


def write_outputs(records, machine, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    data = merge_records(out + ".json", records, machine)
    with open(out + ".json", "w") as f:
        json.dump(data, f, indent=1)
    with open(out + ".md", "w") as f:
        f.write(markdown(data))
    plot(data, out + ".png")


def render(out):
    """Rewrite <out>.md and <out>.png from <out>.json (nothing measured)."""
    with open(out + ".json") as f:
        data = json.load(f)
    with open(out + ".md", "w") as f:
        f.write(markdown(data))
    plot(data, out + ".png")


if __name__ == "__main__":
    render(sys.argv[1])
