#!/usr/bin/env bash
# Everything the CUDA path needs proven and measured, in stages that each fit in a 10-minute command, the most
# valuable first: with only a few minutes on a GPU, run `first`.
#
#   bash benchmarks/gpu.sh prepare     # HERE, with ../shared beside the repo: fills .gpu/ (git-ignored):
#                                      # tokenizer cache, HellaSwag val, the novels' shards, build-nanogpt's side-by-side
#   bash benchmarks/gpu.sh first       # THERE (the GPU machine, .gpu/ carried along), under 8.5 minutes on one H200:
#                                      # probe, preflight, benchmark, profile, CUDA tests (each printed as it ends)
#   bash benchmarks/gpu.sh probe       # versions, the GPU, native bf16, the SDPA kernel each --sdpa_backend gets,
#                                      # and that every newer torch API the code calls exists (20 s)
#   bash benchmarks/gpu.sh preflight   # --preflight of the default 124M recipe on the novels' shards
#   bash benchmarks/gpu.sh benchmark   # 20 steps of --benchmark, the default recipe: tok/s, MFU, peak reserved memory
#   bash benchmarks/gpu.sh profile     # one step under torch.profiler: the top kernels by device time
#   bash benchmarks/gpu.sh tests       # the CUDA test group, verbose, a timeout per test, the cheap ones first
#   bash benchmarks/gpu.sh speed       # --benchmark: -B auto (compiled), chunked CE, cuDNN attention, compile
#                                      # modes, then the speed ladder
#   bash benchmarks/gpu.sh eval        # HellaSwag: all 10,042 val examples, 124M, bf16, compiled; CORE on a stand-in
#   bash benchmarks/gpu.sh side        # build-nanogpt's own script against this one, same shards
#   bash benchmarks/gpu.sh recipes     # --recipe gpt2, llama, speedrun, speedrun-simple (Muon, --val_tokens) at
#                                      # 124M on the novels: val loss at equal tokens (7.9M each)
#   bash benchmarks/gpu.sh memory      # GPT-2 XL at -B 4 on one GPU: DDP and --fsdp, each with and without
#                                      # --recompute (peak memory against benchmarks/README.md's arithmetic)
#
# GPU_DRY=1 runs any stage on CPU with the same commands and flags, only the sizes swapped for tiny ones (and
# --device cpu): the test suite does, so that no command can die on the GPU at parsing, a missing file or a
# renamed flag. Logs go to $OUT (or gpu_results/), one file per stage, and a line per result to summary.txt.
# The GPU machine has no network and no `datasets`: everything it reads comes from .gpu/ ($GPU_DATA).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: bash benchmarks/gpu.sh prepare|first|probe|preflight|benchmark|profile|tests|speed|eval|side|recipes|memory}
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
GPU=${GPU_DATA:-$PWD/.gpu}
export GPT2_SHARED_DATA=$GPU/data TIKTOKEN_CACHE_DIR=$GPU/data/tiktoken_cache HELLASWAG_CACHE_DIR=$GPU/hellaswag
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# one compiled graph serves the next stage that compiles the same model (the preflight's, the benchmark's, ...)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$GPU/inductor}
PY=${PYTHON:-python3}
DRY=${GPU_DRY:-}
# the dry run's sizes: last on every command line, so they win over the stage's own
TINY_TRAIN=(--device cpu --n_layer 2 --n_head 2 --n_embd 64 --block_size 64 -T 64 -B 2 --total_batch_size 128
            --max_steps 6 --hellaswag_limit 8)
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
header() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

prepare() {
    local shared=../shared/data corpus
    corpus=${GPU_CORPUS:-$shared/novels/english_novels_95.jsonl.xz}
    local shard_size=1000000
    [ -n "$DRY" ] && corpus=${GPU_CORPUS:-$shared/tinyshakespeare} shard_size=50000  # (the novels take minutes)
    rm -rf "$GPU" && mkdir -p "$GPU/data/hellaswag" "$GPU/hellaswag"
    cp -r "$shared/tiktoken_cache" "$GPU/data/"
    cp "$shared/hellaswag/hellaswag_val_preprocessed.jsonl" "$GPU/data/hellaswag/"
    cp "$shared/hellaswag/hellaswag_val_preprocessed.jsonl" "$GPU/hellaswag/hellaswag_val.jsonl"
    cp -r ../shared/bench ../shared/reference "$GPU/"
    # the corpus as shards (the GPU machine has no `datasets`): the val shard and 8 train shards, 18 MB
    local tmp
    tmp=$(mktemp -d)
    $PY fineweb.py --dataset "$corpus" --out_dir "$tmp" --shard_size $shard_size --num_proc 2 \
        > "$OUT/prepare.log" 2>&1 || { rm -rf "$tmp"; echo "prepare: fineweb.py failed on $corpus (see $OUT/prepare.log)"; return 1; }
    mkdir -p "$GPU/novels"
    cp "$tmp"/*_val_*.npy $(ls "$tmp"/*_train_*.npy | head -8) "$GPU/novels/"
    rm -rf "$tmp"
    git rev-parse --short HEAD > "$GPU/commit"  # the GPU machine gets a working tree without .git
    du -sh "$GPU"  # it travels with `carry: [".gpu"]`, within the 64 MiB the working tree may take
}

machine() {
    header machine
    [ -z "$DRY" ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 \
        | tee -a "$OUT/summary.txt"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/summary.txt"
    note "commit $(cat "$GPU/commit" 2>/dev/null || echo unknown) (when prepare ran)"
}

probe() {  # under 20 s: before anything long, what this machine and its torch offer
    header probe
    timeout "${1:-60}" $PY benchmarks/gpu_probe.py ${DRY:+--device cpu} 2>&1 | tee "$OUT/probe.log"
    note "probe: $(grep -c ': ok$' "$OUT/probe.log") APIs ok, $(grep -c 'MISSING' "$OUT/probe.log") missing; $(grep -m1 'auto:' "$OUT/probe.log")"
}

preflight() {  # the default recipe's every phase on this GPU, and its projected time
    header preflight
    TORCH_LOGS=recompiles,graph_breaks timeout "${1:-300}" \
        $PY train_gpt2.py --preflight --data_dir "$GPU/novels" --log_dir "$OUT/preflight_log" \
        ${DRY:+"${TINY_TRAIN[@]}"} 2>&1 | tee "$OUT/preflight.log" | grep -E '^preflight|error|Recompiling|Graph break'
    note "$(grep -E '^preflight (passed|failed)|error:' "$OUT/preflight.log" | tail -1 || echo 'preflight: no result')"
    grep -E '^preflight: (speed|peak|the run)' "$OUT/preflight.log" >> "$OUT/summary.txt"
}

bench() {  # bench NAME SECONDS LOG FLAGS...: one --benchmark run of the default recipe, GPT-2 124M, B=64, T=1024
    local name=$1 seconds=$2 log=$3 line
    shift 3
    line=$(timeout "$seconds" $PY train_gpt2.py --benchmark --max_steps 30 "$@" ${DRY:+"${TINY_TRAIN[@]}"} 2>&1 \
        | tee -a "$OUT/$log" | grep '^benchmark:')
    note "$name: ${line:-FAILED (see $log)}"
}

benchmark() {  # 20 steps: a steadier tok/s and MFU than the preflight's 3, and the peak reserved memory
    header benchmark
    bench "benchmark (default recipe, 20 steps)" "${1:-150}" benchmark.log --max_steps 20
}

profile() {  # one step under torch.profiler, so the next speed work knows where the time goes
    header profile
    timeout "${1:-120}" $PY benchmarks/profile_step.py --top 25 -- ${DRY:+"${TINY_TRAIN[@]}"} 2>&1 \
        | grep -v '^STAGE:\|USDT' | tee "$OUT/profile.log" | grep -E -A32 '^profiled step|[Ee]rror'
    note "profile: $(grep -m1 '^profiled step' "$OUT/profile.log" || echo 'FAILED (see profile.log)')"
}

tests() {  # each test within GPT2_TEST_TIMEOUT seconds; test_cuda.py holds the cheap ones first
    header tests
    local collect=()
    [ -n "$DRY" ] && collect=(--collect-only)  # on CPU they skip: the suite runs their CPU halves itself
    GPT2_TEST_TIMEOUT=${GPT2_TEST_TIMEOUT:-150} timeout "${1:-540}" $PY -m pytest -v -rA --tb=short -m cuda \
        "${collect[@]}" tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | grep -E 'PASSED|FAILED|ERROR|SKIPPED|passed|failed|tests collected'
    note "cuda tests: $(tail -1 "$OUT/tests.log")"
}

case "$STAGE" in
    prepare) prepare ;;
    first) machine; probe 30; preflight 200; benchmark 90; profile 50; tests 140 ;;  # 510 s at most
    probe) machine; probe ;;
    preflight) machine; preflight ;;
    benchmark) machine; benchmark ;;
    profile) machine; profile ;;
    tests) machine; tests ;;
    speed)
        : > "$OUT/speed.log"
        bench "default (B=64)" 120 speed.log
        bench "-B auto" 150 speed.log -B auto
        bench "--chunked_ce 8192" 120 speed.log --chunked_ce 8192
        bench "--sdpa_backend cudnn" 120 speed.log --sdpa_backend cudnn
        bench "--compile_mode max-autotune-no-cudagraphs" 240 speed.log --compile_mode max-autotune-no-cudagraphs
        timeout 420 $PY benchmarks/ladder.py ${DRY:+--size tiny -B 2 -T 32 --steps 3 --device cpu} 2>&1 \
            | tee "$OUT/ladder.log" | tail -16 ;;
    eval)
        timeout 580 $PY benchmarks/eval_speed.py --size 124M --limit 0 --device cuda --dtype bf16 --compile \
            ${DRY:+--size small --limit 8 --new_tokens 16 --device cpu --dtype fp32 --core_items 4} \
            2>&1 | tee "$OUT/eval.log" | tail -8
        note "eval: $(grep '^CORE' "$OUT/eval.log")"
        note "eval: $(tail -1 "$OUT/eval.log")" ;;
    side)
        if [ -n "$DRY" ]; then  # build-nanogpt's own 124M run needs the GPU; its project command is dry-run by the suite
            note "side by side: skipped in a dry run"
        else
            timeout 580 bash "$GPU/bench/gpu_side_by_side.sh" 40 2>&1 | tee "$OUT/side.log" | tail -5
            note "side by side: $(tail -1 "$OUT/side.log")"
        fi ;;
    recipes)
        timeout 580 $PY benchmarks/recipes.py --data_dir "$GPU/novels" --size 124M --device cuda --steps 60 \
            --batch 131072 -B 32 -T 1024 --val_steps 20 --factors 1 --budgets 1 \
            ${DRY:+--size proxy --device cpu --steps 2 --batch 256 -B 2 -T 64 --val_steps 1} 2>&1 \
            | tee "$OUT/recipes.log" | tail -6
        note "recipes: $(grep -E '^\| (gpt2|llama|speedrun|speedrun-simple) ' "$OUT/recipes.log" | tr '\n' ' ')" ;;
    memory)
        : > "$OUT/memory.log"
        for flags in "" "--recompute" "--fsdp" "--fsdp --recompute"; do
            # shellcheck disable=SC2086
            line=$(timeout 140 $PY -m torch.distributed.run --standalone --nproc_per_node=1 train_gpt2.py --benchmark \
                --model gpt2-xl -B 4 --total_batch_size 4096 --max_steps 6 $flags ${DRY:+"${TINY_TRAIN[@]}"} 2>&1 \
                | tee -a "$OUT/memory.log" | grep '^benchmark:')
            note "gpt2-xl -B 4 ${flags:-(DDP)}: ${line:-FAILED (see memory.log)}"
        done ;;
    *) echo "unknown stage $STAGE"; exit 2 ;;
esac
