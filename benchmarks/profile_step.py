"""
Where one training step's time goes: train_gpt2.py's own setup and train_step (random tokens, as --benchmark),
a few warm-up steps (compilation, the allocator), then one step under torch.profiler; prints the top
operators and kernels by their own (self) time on the device, or on the CPU without a GPU.

    python benchmarks/profile_step.py                       # the default 124M recipe, B=64
    python benchmarks/profile_step.py --top 30 -- -B 16     # after --, any train_gpt2.py flags
"""

import argparse
import contextlib
import io
import os
import sys

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt2  # noqa: E402
from machinery import checkpoints  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--top", type=int, default=20, help="rows of the table")
    p.add_argument("--warmup", type=int, default=3, help="steps before the profiled one")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="train_gpt2.py flags, after --")
    args = p.parse_args(argv)
    flags = [f for f in args.flags if f != "--"]
    run_args = train_gpt2.parse_args(["--benchmark", "--max_steps", str(args.warmup + 1), *flags])
    compute = train_gpt2.compute_init(run_args)
    inputs = train_gpt2.check_inputs(run_args, compute)
    with checkpoints.claim_log_dir(run_args, holder=False) as was_ours:
        run = train_gpt2.setup_run(run_args, compute, inputs, was_ours)
        for step in range(args.warmup):
            loss = train_gpt2.train_step(run, step, [])[0]
        cuda = compute.device_type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof, contextlib.redirect_stdout(io.StringIO()):
            loss, _, _, dt, _, _ = train_gpt2.train_step(run, args.warmup, [])
    print(f"profiled step {args.warmup}: {dt * 1000:.1f} ms (under the profiler), loss {loss:.4f}, "
          f"{run.grad_accum_steps} micro-steps of -B {run_args.batch_size} x -T {run_args.seq_len} on {compute.device}")
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=args.top, max_name_column_width=60))


if __name__ == "__main__":
    main()
