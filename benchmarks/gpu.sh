#!/usr/bin/env bash
# Everything the CUDA path needs proven and measured, in stages that each fit in a 10-minute command, the most
# valuable first: with only a few minutes on a GPU, run `first`.
#
#   bash benchmarks/gpu.sh prepare     # HERE, with ../shared beside the repo: fills .gpu/ (git-ignored):
#                                      # tokenizer cache, HellaSwag val, build-nanogpt and its side-by-side
#   bash benchmarks/gpu.sh first       # THERE (the GPU machine, .gpu/ carried along): preflight, then tests
#   bash benchmarks/gpu.sh preflight   # --preflight of the default 124M recipe (on the novels' shards)
#   bash benchmarks/gpu.sh tests       # the CUDA test group
#   bash benchmarks/gpu.sh speed       # --benchmark of the default 124M recipe, -B auto, chunked CE, cuDNN
#                                      # attention, compile modes, then the speed ladder
#   bash benchmarks/gpu.sh eval        # HellaSwag: all 10,042 val examples, 124M, bf16, compiled
#   bash benchmarks/gpu.sh side        # build-nanogpt's own script against this one, same shards
#   bash benchmarks/gpu.sh recipes     # --recipe gpt2, llama, speedrun, speedrun-simple at 124M on the novels: val loss at
#                                      # equal tokens (7.9M each, one learning rate each)
#   bash benchmarks/gpu.sh memory      # GPT-2 XL at -B 4 on one GPU: DDP and --fsdp, each with and without
#                                      # --recompute (peak memory against benchmarks/README.md's arithmetic)
#
# Logs go to $OUT (or gpu_results/), one file per stage, and a line per measurement to summary.txt.
# The GPU machine has no network and no `datasets`: everything it reads comes from .gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: bash benchmarks/gpu.sh prepare|first|preflight|tests|speed|eval|side|recipes|memory}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export GPT2_SHARED_DATA=$PWD/.gpu/data TIKTOKEN_CACHE_DIR=$PWD/.gpu/data/tiktoken_cache
export HELLASWAG_CACHE_DIR=$PWD/.gpu/hellaswag HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
note() { echo "$*" | tee -a "$OUT/summary.txt"; }

prepare() {
    local shared=../shared/data
    rm -rf .gpu && mkdir -p .gpu/data/hellaswag .gpu/hellaswag
    cp -r "$shared/tiktoken_cache" .gpu/data/
    cp "$shared/hellaswag/hellaswag_val_preprocessed.jsonl" .gpu/data/hellaswag/
    cp "$shared/hellaswag/hellaswag_val_preprocessed.jsonl" .gpu/hellaswag/hellaswag_val.jsonl
    cp -r ../shared/bench ../shared/reference .gpu/
    # the novels as shards (the GPU machine has no `datasets`): the val shard and 8 train shards, 18 MB
    local tmp
    tmp=$(mktemp -d)
    $PY fineweb.py --dataset "$shared/novels/english_novels_95.jsonl.xz" --out_dir "$tmp" --shard_size 1000000 \
        > /dev/null || { rm -rf "$tmp"; echo "prepare: fineweb.py failed on the novels"; return 1; }
    mkdir -p .gpu/novels
    cp "$tmp"/*_val_*.npy $(ls "$tmp"/*_train_*.npy | head -8) .gpu/novels/
    rm -rf "$tmp"
    git rev-parse --short HEAD > .gpu/commit  # the GPU machine gets a working tree without .git
    du -sh .gpu  # it travels with `carry: [".gpu"]`, within the 64 MiB the working tree may take
}

bench() {  # bench NAME FLAGS...: one --benchmark run of GPT-2 124M, B=64, T=1024, 0.5M-token steps
    local name=$1; shift
    local line
    line=$($PY train_gpt2.py --benchmark --max_steps 30 "$@" 2>&1 | tee -a "$OUT/speed.log" | grep '^benchmark:')
    note "$name: ${line:-FAILED (see speed.log)}"
}

machine() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/summary.txt"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/summary.txt"
    note "commit $(cat .gpu/commit 2>/dev/null || echo unknown) (when prepare ran)"
}

preflight() {  # the default recipe's every phase on this GPU, and its projected time: under 4 minutes
    timeout "${1:-300}" $PY train_gpt2.py --preflight --data_dir .gpu/novels --log_dir "$OUT/preflight_log" 2>&1 \
        | tee "$OUT/preflight.log" | grep -E '^preflight|error' | tail -20
    note "preflight: $(grep -E '^preflight (passed|failed)|error:' "$OUT/preflight.log" | tail -1)"
    grep -E '^preflight: (speed|peak|the run)' "$OUT/preflight.log" >> "$OUT/summary.txt"
}

tests() {
    timeout "${1:-540}" $PY -m pytest -q -rs -m cuda tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -3
    note "cuda tests: $(tail -1 "$OUT/tests.log")"
}

case "$STAGE" in
    prepare) prepare ;;
    first) machine; preflight 240; tests 330 ;;
    preflight) machine; preflight ;;
    tests) machine; tests ;;
    speed)
        : > "$OUT/speed.log"
        bench "default (B=64)"
        bench "-B auto" -B auto
        bench "--chunked_ce 8192" --chunked_ce 8192
        bench "--sdpa_backend cudnn" --sdpa_backend cudnn
        bench "--compile_mode max-autotune-no-cudagraphs" --compile_mode max-autotune-no-cudagraphs
        timeout 420 $PY benchmarks/ladder.py 2>&1 | tee "$OUT/ladder.log" | tail -16 ;;
    eval)
        timeout 580 $PY benchmarks/eval_speed.py --size 124M --limit 0 --device cuda --dtype bf16 --compile \
            2>&1 | tee "$OUT/eval.log" | tail -8 ;;
    side)
        timeout 580 bash .gpu/bench/gpu_side_by_side.sh 40 2>&1 | tee "$OUT/side.log" | tail -5
        note "side by side: $(tail -1 "$OUT/side.log")" ;;
    recipes)
        timeout 580 $PY benchmarks/recipes.py --data_dir .gpu/novels --size 124M --device cuda --steps 60 \
            --batch 131072 -B 32 -T 1024 --val_steps 20 --factors 1 --budgets 1 2>&1 | tee "$OUT/recipes.log" | tail -6
        note "recipes: $(grep -E '^\| (gpt2|llama|speedrun|speedrun-simple) ' "$OUT/recipes.log" | tr '\n' ' ')" ;;
    memory)
        : > "$OUT/memory.log"
        for flags in "" "--recompute" "--fsdp" "--fsdp --recompute"; do
            line=$(timeout 140 $PY -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt2.py --benchmark \
                --model gpt2-xl -B 4 --total_batch_size 4096 --max_steps 6 $flags 2>&1 | tee -a "$OUT/memory.log" \
                | grep '^benchmark:')
            note "gpt2-xl -B 4 ${flags:-(DDP)}: ${line:-FAILED (see memory.log)}"
        done ;;
    *) echo "unknown stage $STAGE"; exit 2 ;;
esac
