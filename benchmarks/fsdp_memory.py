"""
DDP against --fsdp: what each process holds, and how long a step takes, at 1, 2 and 4 processes. Every
cell is a fresh `torchrun ... train_gpt2.py --benchmark` (rank 0's figures; the ranks are alike). It
prints rank 0's weights + gradients + optimizer state (counted tensor by tensor: the part FSDP shards),
its peak memory over the steps (on CPU the process's peak resident memory, torch itself and the activations
included; every block of 64 KiB or more is its own mapping, returned to the system when freed), and the
median step.

    python benchmarks/fsdp_memory.py                         # 12 x 768 (GPT-2 124M) on CPU with gloo
    python benchmarks/fsdp_memory.py --device cuda --ranks 1 2 4 8 -B 8 -T 1024   # on GPUs

Results measured so far are in benchmarks/README.md.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ["--n_layer", "12", "--n_head", "12", "--n_embd", "768", "--block_size", "1024"]


def run_cell(args, ranks, fsdp):
    """One benchmark run; its BENCHMARK line's figures, or {"error": the last line of its stderr}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           os.path.join(REPO, "train_gpt2.py"), "--benchmark", "--device", args.device, *MODEL,
           "--max_steps", str(args.steps), "--warmup_steps", "1", "-B", str(args.batch_size),
           "-T", str(args.seq_len), "--total_batch_size", str(args.batch_size * args.seq_len * ranks),
           *(["--fsdp"] if fsdp else [])]
    # the same threads per process in every cell (torchrun sets 1 only for several processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if args.device == "cpu":
        # freed memory back to the system at once, so that the peak is what was alive: glibc's default raises its
        # mmap threshold as large blocks are freed, then keeps blocks below it resident, which hid FSDP's saving
        # (benchmarks/README.md has both measurements)
        cmd.append("--no-keep_freed_memory")
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCHMARK ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][len("BENCHMARK "):])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="process counts")
    p.add_argument("-B", "--batch_size", type=int, default=1, help="micro-batch per process (one micro-step)")
    p.add_argument("-T", "--seq_len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="benchmark steps per cell (the first is warm-up)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS in every process")
    args = p.parse_args(argv)
    print(f"12 x 768 on {args.device}, -B {args.batch_size} -T {args.seq_len} per process, {args.steps} steps, "
          f"OMP_NUM_THREADS={args.threads}")
    print(f"{'ranks':>5} {'mode':>5} | {'state GiB':>9} | {'peak GiB':>8} | {'ms/step':>9} | vs DDP")
    for ranks in args.ranks:
        ddp_ms = None
        for fsdp in (False, True):
            r = run_cell(args, ranks, fsdp)
            mode = "FSDP" if fsdp else "DDP"
            if "error" in r:
                print(f"{ranks:>5} {mode:>5} | error: {r['error']}", flush=True)
                continue
            ddp_ms = ddp_ms if fsdp else r["ms_per_step"]
            versus = f"{r['ms_per_step'] / ddp_ms:.2f}x" if fsdp and ddp_ms else ""
            print(f"{ranks:>5} {mode:>5} | {r['state_gib']:>9.3f} | {r['peak_memory_gib']:>8.2f} | "
                  f"{r['ms_per_step']:>9.1f} | {versus}", flush=True)


if __name__ == "__main__":
    main()
