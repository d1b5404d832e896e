#!/usr/bin/env bash
# Every GPU measurement of the project in one run (under 10 minutes: 560 s of limits): embedding speed (official
# recipe vs e5v's engine, benchmarks/embed_speed.py) and the training step (benchmarks/train_step.py): text
# triplets, then image-caption pairs through the whole llama3-llava-next-8b (random weights; --images).
# Results go to $OUT (default: benchmarks/results): JSON, markdown, logs, and the environment.
#
#   bash benchmarks/gpu_all.sh                    # on the GPU machine (torch 2.11, transformers 5.17, offline)
#   E5V_BENCH_TINY=1 PYTHON=.venv/bin/python bash benchmarks/gpu_all.sh   # CPU smoke run: tiny widths, same steps
#
# PYTHON: the interpreter (default python3; it needs torch, transformers, peft and accelerate, nothing more).
#
# Each step has its own time limit (EMBED_S, TRAIN_S, TRAIN_IMAGES_S seconds) and writes its results as it goes, so one
# step that fails or runs out of time keeps what it measured and does not stop the other.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false

if [ "${E5V_BENCH_TINY:-0}" = "1" ]; then
  EMBED_ARGS=(--tiny --device cpu --images 4 --texts 32 --workers 2 --image-batches 1,2 --text-batches 15,32 --variants packed,grouped)
  TRAIN_ARGS=(--tiny --device cpu --triplets 8 --chunk 8 --steps 1)
  TRAIN_IMAGES_ARGS=(--images --tiny --device cpu --dtype float32 --triplets 2 --chunk 2 --steps 1 --warmup 0 --lora-r 8)
  EMBED_S="${EMBED_S:-300}" TRAIN_S="${TRAIN_S:-200}" TRAIN_IMAGES_S="${TRAIN_IMAGES_S:-200}"
else
  EMBED_ARGS=(--device cuda --dtype bfloat16 --images 64 --texts 1024 --workers 8 --image-batches 1,8 --text-batches 15,256 --variants packed,grouped,flex)
  TRAIN_ARGS=(--device cuda --dtype bfloat16 --triplets 128 --tokens 44 --chunk 96 --steps 3)
  # 16 COCO-sized JPEGs (up to 2,365 tokens each at full AnyRes) and their captions at training's defaults: at most
  # 72 sequences and 16,384 padded tokens per GradCache chunk (6 or 7 images), gradient checkpointing on; preparation
  # timed as part of the step. Prepared, never run on a GPU yet: the peak memory is what this run will report.
  TRAIN_IMAGES_ARGS=(--images --device cuda --dtype bfloat16 --triplets 16 --chunk 72 --chunk-tokens 16384
                     --e5v-checkpointing --steps 2 --warmup 1)
  # the three steps with their kill grace fit 560 s (one device command may run 10 minutes)
  EMBED_S="${EMBED_S:-300}" TRAIN_S="${TRAIN_S:-150}" TRAIN_IMAGES_S="${TRAIN_IMAGES_S:-80}"
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.version.cuda)"
  "$PY" -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn: not installed"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

status=0
echo "== embedding speed (limit ${EMBED_S}s)"
timeout -k 10 "$EMBED_S" "$PY" benchmarks/embed_speed.py "${EMBED_ARGS[@]}" \
  --out "$OUT/embed_speed.json" --markdown "$OUT/embed_speed.md" 2>&1 | tee "$OUT/embed_speed.log" || status=1

if [ -f benchmarks/train_step.py ]; then
  echo "== training step (limit ${TRAIN_S}s)"
  timeout -k 10 "$TRAIN_S" "$PY" benchmarks/train_step.py "${TRAIN_ARGS[@]}" 2>&1 | tee "$OUT/train_step.log" || status=1
  echo "== training step with images (limit ${TRAIN_IMAGES_S}s)"
  timeout -k 10 "$TRAIN_IMAGES_S" "$PY" benchmarks/train_step.py "${TRAIN_IMAGES_ARGS[@]}" 2>&1 | tee -a "$OUT/train_step.log" || status=1
  grep '^{' "$OUT/train_step.log" > "$OUT/train_step.jsonl" || true
fi

[ -f "$OUT/embed_speed.md" ] && cat "$OUT/embed_speed.md"
echo "gpu_all: exit $status; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
