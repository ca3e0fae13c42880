"""
The speed ladder of build-nanogpt's lecture, one rung at a time, each rung adding one change to the
one before it (fp32 -> TF32 -> bf16 -> compile -> flash attention -> vocab 50304 -> fused AdamW: that
last rung is build-nanogpt's own configuration), then the rungs past it (batches prefetched through
pinned memory, the loss in chunks, the cuDNN attention kernel, compile's max-autotune), every rung a
fresh `train_gpt2.py --benchmark` process. Prints one table, and the last rung against build-nanogpt's.

    python benchmarks/ladder.py                                  # GPT-2 124M, B=16, T=1024 (the lecture's)
    python benchmarks/ladder.py --size tiny --device cpu --steps 4   # a smoke run on a laptop

Results measured so far are in benchmarks/README.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"124M": ["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024"],
         "tiny": ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64"]}

# (name, flags, CUDA only); each rung keeps the flags of the ones before it. "{chunk}" is an eighth of B*T rows.
BUILD_NANOGPT = "+ fused AdamW"  # the rung that is build-nanogpt's train_gpt2.py
RUNGS = [
    ("fp32", ["--dtype", "fp32", "--no-tf32", "--no-compile", "--attention", "manual", "--vocab_size", "50257",
              "--no-fused_adamw", "--no-prefetch"], False),
    ("+ TF32", ["--tf32"], False),
    ("+ bf16 autocast", ["--dtype", "bf16"], False),
    ("+ torch.compile", ["--compile"], False),
    ("+ flash attention (SDPA)", ["--attention", "sdpa"], False),
    ("+ vocab 50304", ["--vocab_size", "50304"], False),
    (BUILD_NANOGPT, ["--fused_adamw"], False),
    ("+ prefetch, pinned copies", ["--prefetch"], False),
    ("+ chunked cross-entropy", ["--chunked_ce", "{chunk}"], False),
    ("+ cuDNN attention", ["--sdpa_backend", "cudnn"], True),
    ("+ compile max-autotune", ["--compile_mode", "max-autotune-no-cudagraphs"], True),
]


def run_rung(flags, args):
    cmd = [sys.executable, os.path.join(REPO, "train_gpt2.py"), "--benchmark", "--max_steps", str(args.steps),
           "--warmup_steps", "1", "-B", str(args.batch_size), "-T", str(args.seq_len),
           "--total_batch_size", str(args.batch_size * args.seq_len), *SIZES[args.size], *flags]
    if args.device:
        cmd += ["--device", args.device]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCHMARK ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(lines[-1][len("BENCHMARK "):])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="124M")
    p.add_argument("-B", "--batch_size", type=int, default=16)
    p.add_argument("-T", "--seq_len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30, help="steps per rung, the first fifth not timed")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.size == "tiny":
        args.seq_len = min(args.seq_len, 64)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
    print(f"{time.strftime('%Y-%m-%d')} | {name} | torch {torch.__version__} | GPT {args.size} | "
          f"B={args.batch_size} T={args.seq_len} | {args.steps} steps per rung")
    header = f"| {'rung':26s} | {'ms/step':>9s} | {'tok/s':>10s} | {'MFU':>7s} | {'peak mem':>9s} | {'speed-up':>8s} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    flags, first, ms = [], None, {}
    chunk = str(max(1, args.batch_size * args.seq_len // 8))
    for rung, extra, cuda_only in RUNGS:
        flags = flags + [chunk if f == "{chunk}" else f for f in extra]
        if cuda_only and not device.startswith("cuda"):
            print(f"| {rung:26s} | skipped: CUDA only")
            continue
        r = run_rung(flags, args)
        if "error" in r:
            print(f"| {rung:26s} | failed: {r['error'][:80]}")
            continue
        first = first or r["ms_per_step"]
        ms[rung] = r["ms_per_step"]
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1f}%"
        print(f"| {rung:26s} | {r['ms_per_step']:9.1f} | {r['tokens_per_sec']:10,} | {mfu:>7s} | "
              f"{r['peak_memory_gib']:7.2f}Gi | {first / r['ms_per_step']:7.2f}x |", flush=True)
    if BUILD_NANOGPT in ms and len(ms) > 1:
        last = list(ms)[-1]
        print(f"\n{last!r} against build-nanogpt's configuration ({BUILD_NANOGPT!r}): "
              f"{ms[BUILD_NANOGPT] / ms[last]:.2f}x")


if __name__ == "__main__":
    main()
