#!/usr/bin/env bash
# Hybrid-ratio ablation (issue 15, part 3): held-out loss after a fixed token budget for softmax ratios
# 0, 1/8, 1/4, 1/2, 1 at fixed width and depth (8 layers, the tiny preset's width), 2 seeds each, on the embedded
# Shakespeare corpus; then one ratio (1/4) trained again at SP = 4 against its SP = 1 run.
# Measured once with STEPS=400 (docs/quality.md). Usage, from the repository root:
#   STEPS=600 SEEDS="0 1" bash docs/quality/hybrid_ratio.sh            # writes runs/ratio/* and docs/quality/hybrid_ratio.json
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
STEPS=${STEPS:-600}                  # optimizer steps; tokens = STEPS x batch 8 x seq_len 128
SEEDS=${SEEDS:-"0 1"}
ROOT=${ROOT:-runs/ratio}
OUT=${OUT:-docs/quality/hybrid_ratio.json}
declare -A PATTERN=([0]=L [1/8]=LLLLLLLN [1/4]=LLLN [1/2]=LN [1]=N)
COMMON=(--config tiny --max-steps "$STEPS" --data.seq_len 128 --data.batch_size 8 --checkpoint.every 0
        --optim.warmup_steps 30 --run.sample_tokens 0)
MODEL=(--model.dim 64 --model.n_heads 4 --model.n_kv_heads 2 --model.ffn_dim 128 --model.n_layers 8
       --model.loss_chunk_tokens 512)
for ratio in 0 1/8 1/4 1/2 1; do
  for seed in $SEEDS; do
    dir="$ROOT/r${ratio/\//_}-s$seed"
    rm -rf "$dir"
    python launch/pretrain.py "${COMMON[@]}" "${MODEL[@]}" --model.pattern "${PATTERN[$ratio]}" \
      --run.seed "$seed" --data.seed "$seed" --run-dir "$dir"
    python -m launch.evaluate "$dir/model.pt" --seq-len 128 --json "$dir/eval.json"
  done
done
# LASP-2 at SP = 4 against SP = 1 for the 1/4 hybrid (same seed 0: the losses should agree to float32 rounding)
dir="$ROOT/r1_4-s0-sp4"; rm -rf "$dir"
torchrun --nproc-per-node 4 launch/pretrain.py "${COMMON[@]}" "${MODEL[@]}" --model.pattern LLLN --sp 4 \
  --run.seed 0 --data.seed 0 --run-dir "$dir"
torchrun --nproc-per-node 4 -m launch.evaluate "$dir/model.pt" --seq-len 128 --sp 4 --json "$dir/eval.json"
python - "$ROOT" "$OUT" <<'PY'
import glob, json, statistics, sys
root, out = sys.argv[1:]
rows = {}
for f in sorted(glob.glob(f"{root}/*/eval.json")):
    r = json.load(open(f)); rows.setdefault((r["pattern"], r["sp"]), []).append(r["loss"])
table = [{"pattern": p, "softmax_ratio": p.count("N") / len(p), "sp": sp, "heldout_loss": v,
          "mean": statistics.mean(v), "spread": max(v) - min(v)} for (p, sp), v in rows.items()]
json.dump({"records": table}, open(out, "w"), indent=1)
for t in sorted(table, key=lambda t: (t["softmax_ratio"], t["sp"])):
    print(f"{t['pattern']:9s} ratio {t['softmax_ratio']:.3f} sp {t['sp']}  held-out loss {t['mean']:.4f} "
          f"(spread {t['spread']:.4f}, n={len(t['heldout_loss'])})")
PY
python docs/quality/hybrid_ratio_plot.py "$OUT" "$OUT" "${OUT%.json}.png" "$STEPS"
