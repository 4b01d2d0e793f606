#!/usr/bin/env bash
# lmms-eval's `llava_hf` model on an exported nanoVT model, beside eval.py on the same questions: the
# shapes world's held-out short answers and POPE (docs/eval.md §lmms-eval on an exported model).
#
#   bash bench/lmms_eval_check.sh CKPT WORLD [OUT]
#   bash bench/lmms_eval_check.sh out/shapes_v3/stage4/final data/shapes_v3 out/lmms_eval
#
# lmms-eval lives in its own virtual environment (LMMS_VENV, made here if missing): it installs a torch of
# its own and newer packages, so it never goes into nanoVT's environment or CI's. The steps:
#   1. the venv: pip install torch==$LMMS_TORCH (default 2.14.1), then lmms-eval==0.7.3
#   2. python weights.py CKPT --export OUT/hf             (weights, tokenizer, chat template, processor)
#   3. a local task for lmms-eval's --include_path        (JSON Lines + image paths: no download)
#   4. eval.py on the same questions                      (nanoVT's batched greedy answers, its scorers)
#   5. python -m lmms_eval --model llava_hf ...           (transformers' LlavaForConditionalGeneration)
#   6. the two side by side, question by question         (OUT/compare.json)
#   7. the export through AutoProcessor alone vs nanoVT's greedy tokens, question by question
# Environment: PY (nanoVT's python, default python), LMMS_VENV, LMMS_TORCH, LIMIT (first N questions of
# each file; 0 = all), PARITY_LIMIT (the same for step 7, default 200), DEVICE (lmms-eval's device, default cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${1:?usage: bash bench/lmms_eval_check.sh CKPT WORLD [OUT]}
WORLD=${2:?usage: bash bench/lmms_eval_check.sh CKPT WORLD [OUT]}
OUT=${3:-out/lmms_eval}
PY=${PY:-python}
LMMS_VENV=${LMMS_VENV:-$HOME/.venvs/nanovt-lmms}
LMMS_TORCH=${LMMS_TORCH:-2.14.1}
LIMIT=${LIMIT:-0}
PARITY_LIMIT=${PARITY_LIMIT:-200}
DEVICE=${DEVICE:-cpu}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== 1. lmms-eval's environment: $LMMS_VENV"
if [ ! -x "$LMMS_VENV/bin/lmms-eval" ] && ! "$LMMS_VENV/bin/python" -c "import lmms_eval" 2>/dev/null; then
    python3 -m venv "$LMMS_VENV"
    "$LMMS_VENV/bin/pip" install "torch==$LMMS_TORCH"   # first, so that lmms-eval does not pull another build
    # llava_hf imports decord (video) when it loads; lmms-eval 0.7.3 patches filelock 3.x's private _api module
    "$LMMS_VENV/bin/pip" install "lmms-eval==0.7.3" decord "filelock<4"
fi
"$LMMS_VENV/bin/python" -c "import lmms_eval, torch, transformers; print('lmms-eval', lmms_eval.__version__ if hasattr(lmms_eval, '__version__') else '0.7.3', 'torch', torch.__version__, 'transformers', transformers.__version__)"

echo "== 2. export"
rm -rf "$OUT/hf"
$PY weights.py "$CKPT" --export "$OUT/hf" --tokenizer "$WORLD/tokenizer.model"

echo "== 3. the local task"
$PY bench/lmms_eval_check.py task "$WORLD" "$OUT/tasks" --limit "$LIMIT"

echo "== 4. eval.py"
mkdir -p "$OUT/nanovt"
for pair in short:vqa pope:pope; do
    name=${pair%%:*}; metric=${pair##*:}
    rm -f "$OUT/nanovt/answers_$name.jsonl"
    $PY eval.py --ckpt "$CKPT" --tokenizer "$WORLD/tokenizer.model" --questions "$WORLD/eval_$name.jsonl" \
        --image-folder "$WORLD" --answers "$OUT/nanovt/answers_$name.jsonl" --metric "$metric" --limit "$LIMIT" \
        --device cpu --dtype fp32 > "$OUT/nanovt/scores_$name.json"
done

echo "== 5. lmms-eval"
limit=(); [ "$LIMIT" != 0 ] && limit=(--limit "$LIMIT")
"$LMMS_VENV/bin/python" -m lmms_eval --model llava_hf \
    --model_args "pretrained=$OUT/hf,device=$DEVICE,device_map=$DEVICE,dtype=float32" \
    --tasks nanovt_shapes_short,nanovt_shapes_pope --include_path "$OUT/tasks" \
    --batch_size 1 --log_samples --output_path "$OUT/logs" "${limit[@]}"

echo "== 6. side by side"
$PY bench/lmms_eval_check.py compare "$OUT" "$WORLD" --limit "$LIMIT"

echo "== 7. processor-only path vs nanoVT"
$PY bench/lmms_eval_check.py parity "$CKPT" "$OUT/hf" "$WORLD" --limit "$PARITY_LIMIT" | tee "$OUT/parity.txt"
