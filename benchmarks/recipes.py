"""
The recipes against each other (--recipe gpt2, llama, speedrun, speedrun-simple): validation loss per token
budget, at a
scale where each run takes a minute or two on a CPU, or with --size 124M on GPUs.

Every arm trains to each token budget in a run of its own, so each run's schedule ends at its own
budget (a cosine or a cooldown cut short would not be the recipe). Each arm first gets a small
learning-rate sweep at the full budget: every learning rate of its preset times each factor; the best
factor is then used at the smaller budgets. Printed: val loss per arm and budget, and the share of the
baseline's (gpt2's) tokens at which each arm first reaches the baseline's full-budget loss.

    python fineweb.py --dataset ../shared/data/novels/english_novels_95.jsonl.xz --out_dir novels \\
        --shard_size 1000000
    python benchmarks/recipes.py --data_dir novels      # the CPU proxy: 15 runs, 49 minutes on 2 busy cores
    # GPT-2 124M on 8 GPUs: 10B tokens for the full budget, so 0.25 of it is the speedrun's 2.5B
    python benchmarks/recipes.py --data_dir edu_fineweb10B --size 124M --device cuda --nproc 8 \\
        --steps 19073 --batch 524288 -B 64 -T 1024 --factors 1

Results measured so far are in benchmarks/README.md.
"""

import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"proxy": ["--n_layer", "4", "--n_head", "4", "--n_embd", "64", "--block_size", "64"],
         "124M": []}
ARMS = ("gpt2", "llama", "speedrun", "speedrun-simple")
LR_FLAGS = {"gpt2": {"max_lr": 6e-4}, "llama": {"max_lr": 6e-4},
            "speedrun": {"max_lr": 0.05, "adam_lr": 0.008, "embed_lr": 0.6},
            "speedrun-simple": {"max_lr": 0.025, "embed_lr": 0.7, "adam_lr": 0.004, "scalar_lr": 0.015}}
# learning-rate factors swept per arm: a tiny model takes larger AdamW steps than GPT-2 124M's
FACTORS = {"gpt2": (1, 3, 10), "llama": (1, 3, 10), "speedrun": (0.5, 1, 2), "speedrun-simple": (0.5, 1, 2)}
BUDGETS = (0.25, 0.5, 1.0)  # shares of the full token budget, each its own run


def train(arm, factor, steps, args, log_root):
    """One run to `steps` steps; returns its final val loss."""
    log_dir = os.path.join(log_root, f"{arm}_{factor}_{steps}")
    # warmup: GPT-2's 715 of 19,073 steps, in proportion (the speedrun presets have none)
    warmup = 0 if arm.startswith("speedrun") else max(1, round(steps * 715 / 19073))
    lrs = [x for flag, lr in LR_FLAGS[arm].items() for x in (f"--{flag}", f"{lr * factor:g}")]
    launcher = [sys.executable] if args.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    cmd = [*launcher, os.path.join(REPO, "train_gpt2.py"), "--recipe", arm, "--data_dir", args.data_dir,
           "--log_dir", log_dir, *SIZES[args.size], "-B", str(args.B), "-T", str(args.T),
           "--total_batch_size", str(args.batch), "--max_steps", str(steps), "--warmup_steps", str(warmup),
           "--eval_every", str(steps), "--val_steps", str(args.val_steps), "--val_tokens", "0",  # one val set
           "--no-hellaswag", "--no-sample",
           "--save_every", "0", "--checkpoint_every", str(10 * steps), "--seed", str(args.seed), *lrs]
    if args.device:
        cmd += ["--device", args.device, "--dtype", "fp32" if args.device == "cpu" else "bf16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"recipes.py: {arm} x{factor} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    with open(os.path.join(log_dir, "log.txt")) as f:
        vals = [float(line.split()[2]) for line in f if line.split()[1] == "val"]
    print(f"  {arm:9s} lr x{factor:<4g} {steps:5d} steps: val {vals[-1]:.4f}", flush=True)
    return vals[-1]


def crossing(losses, target):
    """The smallest share of the budget at which the loss reaches target, interpolating between budgets
    in log tokens; None if it never does."""
    points = sorted(losses.items())
    if points[0][1] <= target:
        return points[0][0]
    for (b0, l0), (b1, l1) in zip(points, points[1:]):
        if l1 <= target:
            t = (l0 - target) / (l0 - l1)
            return b0 * (b1 / b0) ** t
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="shards as fineweb.py writes them")
    p.add_argument("--size", choices=SIZES, default="proxy")
    p.add_argument("--steps", type=int, default=120, help="steps of the full budget")
    p.add_argument("--batch", type=int, default=1024, help="tokens per step")
    p.add_argument("-B", type=int, default=16)
    p.add_argument("-T", type=int, default=64)
    p.add_argument("--val_steps", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun), e.g. one per GPU")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--factors", type=float, nargs="+", default=None, help="one sweep for every arm instead")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS),
                   help="shares of the full budget, each its own run (1 is always one of them)")
    args = p.parse_args(argv)
    if not all(0 < b <= 1 for b in args.budgets):
        p.error(f"--budgets are shares of the full budget, in (0, 1]; got {args.budgets}")
    args.budgets = sorted(set(args.budgets) | {1.0})

    log_root = tempfile.mkdtemp(prefix="recipes_")
    results = {}  # arm -> {share of budget: val loss}
    for arm in args.arms:
        factors = args.factors or FACTORS[arm]
        print(f"{arm}: learning-rate sweep at {args.steps} steps", flush=True)
        sweep = {f: train(arm, f, args.steps, args, log_root) for f in factors}
        best = min(sweep, key=sweep.get)
        results[arm] = {1.0: sweep[best]}
        for share in args.budgets[:-1]:
            results[arm][share] = train(arm, best, round(args.steps * share), args, log_root)
        results[arm]["factor"] = best
    report(results, args)


def report(results, args):
    tokens = args.steps * args.batch
    print(f"\nval loss ({args.size}, {args.val_steps * args.batch:,} val tokens); budgets in tokens")
    print("| arm | best lr factor | " + " | ".join(f"{share * tokens:,.0f}" for share in args.budgets) +
          " | reaches gpt2's full-budget loss at |")
    print("|---|---|" + "---|" * len(args.budgets) + "---|")
    target = results.get("gpt2", {}).get(1.0)
    for arm, losses in results.items():
        shares = {k: v for k, v in losses.items() if k != "factor"}
        at = crossing(shares, target) if target is not None else None
        where = "n/a" if target is None else ("not within the budget" if at is None else f"{at:.2f} of its tokens")
        if at == args.budgets[0] and shares[at] < target:
            where = f"at most {at:.2f} (already at the smallest budget)"
        print(f"| {arm} | x{losses['factor']:g} | " + " | ".join(f"{losses[s]:.4f}" for s in args.budgets) +
              f" | {where} |")


if __name__ == "__main__":
    main()
