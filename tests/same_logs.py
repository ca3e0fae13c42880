"""
A refactor's proof: the same CPU trainings, run by two checkouts, write the same bytes.

    python tests/same_logs.py --repo /tmp/before --out /tmp/logs_before
    python tests/same_logs.py --repo .           --out /tmp/logs_after
    python tests/same_logs.py --compare /tmp/logs_before /tmp/logs_after

Each config trains a tiny GPT with the checkout's train_gpt2.py on Tiny Shakespeare (../shared/data),
tokenized here with tiktoken, so both checkouts read the very same shards. Recorded per config: log.txt,
the lines of stdout that carry no timing (evaluations, samples, the run's description), and a CRC-32 of
every tensor of the final checkpoint. Not a test (minutes, and two checkouts): run by hand around a change
that must not change behaviour.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("GPT2_SHARED_DATA") or os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "-B", "4", "-T", "32",
        "--total_batch_size", "256", "--max_steps", "12", "--warmup_steps", "2", "--max_lr", "3e-3",
        "--eval_every", "4", "--val_steps", "2", "--hellaswag_limit", "12", "--save_every", "4",
        "--keep_last", "3", "--checkpoint_every", "100"]
CONFIGS = {
    "plain": TINY,
    "accumulate": TINY + ["--total_batch_size", "512"],
    "shuffle": TINY + ["--shuffle"],
    "speed_switches": TINY + ["--attention", "manual", "--chunked_ce", "37", "--no-prefetch", "--fused_adamw",
                              "--sdpa_backend", "math", "--no-keep_freed_memory"],
    "compile": TINY + ["--compile"],
    "llama": TINY + ["--recipe", "llama", "--max_steps", "12", "--warmup_steps", "2"],
    "speedrun": TINY + ["--recipe", "speedrun", "--max_steps", "12", "--warmup_steps", "2", "--untie_head"],
    "first_try": ["--first_try", "--max_steps", "24", "--warmup_steps", "3", "--hellaswag_limit", "12",
                  "--eval_every", "8", "--save_every", "8"],
}
# stdout lines that hold no timing: what a run says about itself and its evaluations
KEPT_PREFIXES = ("validation loss", "HellaSwag", "sample ", "model:", "total batch", "recipe ", "train shards",
                 "resuming")


def make_shards(root):
    """Tiny Shakespeare as 50,000-token uint16 shards (shard 0 val), each document led by <|endoftext|>."""
    import tiktoken

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))
    enc = tiktoken.get_encoding("gpt2")
    with open(os.path.join(SHARED, "tinyshakespeare", "input.txt")) as f:
        tokens = np.array([enc.eot_token] + enc.encode_ordinary(f.read()), dtype=np.uint16)
    os.makedirs(root, exist_ok=True)
    for i in range(len(tokens) // 50_000):
        split = "val" if i == 0 else "train"
        np.save(os.path.join(root, f"tinyshakespeare_{split}_{i:06d}.npy"), tokens[i * 50_000:(i + 1) * 50_000])


def train(repo, args, log_dir, env, nproc=1):
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + [os.path.join(repo, "train_gpt2.py"), *args, "--log_dir", log_dir]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    out = os.path.dirname(log_dir)  # each checkout's own folder, named the same way in both records
    return [line.replace(out, "OUT") for line in proc.stdout.splitlines() if line.startswith(KEPT_PREFIXES)]


def tensor_crcs(path):
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = zlib.crc32(obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}/{k}", v)

    walk("model", ckpt["model"])
    walk("optimizer", ckpt["optimizer"]["state"] if "state" in ckpt["optimizer"] else ckpt["optimizer"])
    return out


def record(repo, out, only):
    data = os.path.join(out, "shards")
    make_shards(data)
    hella = os.path.join(out, "hellaswag")
    os.makedirs(hella, exist_ok=True)
    shutil.copy(os.path.join(SHARED, "hellaswag", "hellaswag_val_preprocessed.jsonl"),
                os.path.join(hella, "hellaswag_val.jsonl"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HELLASWAG_CACHE_DIR=hella, PYTHONUNBUFFERED="1",
               TIKTOKEN_CACHE_DIR=os.path.join(SHARED, "tiktoken_cache"))
    runs = dict(CONFIGS, resumed=TINY, torchrun_2=TINY)
    for name, flags in runs.items():
        if only and name not in only:
            continue
        log_dir = os.path.join(out, name)
        flags = ["--data_dir", data] + flags
        if name == "resumed":  # the plain run's ckpt_00004.pt and its log as if killed in step 6, resumed
            full = os.path.join(out, "resumed_source")
            train(repo, flags, full, env)
            os.makedirs(log_dir)
            shutil.copy(os.path.join(full, "ckpt_00004.pt"), log_dir)
            with open(os.path.join(full, "log.txt")) as f:
                kept = [line for line in f if int(line.split()[0]) < 6]
            with open(os.path.join(log_dir, "log.txt"), "w") as f:
                f.writelines(kept)
        # compiled CPU kernels split their reductions over threads, in an order that varies from run to run
        run_env = dict(env, OMP_NUM_THREADS="1") if name == "compile" else env
        stdout = train(repo, flags, log_dir, run_env, nproc=2 if name == "torchrun_2" else 1)
        final = max(f for f in os.listdir(log_dir) if f.startswith("model_"))
        with open(os.path.join(log_dir, "record.json"), "w") as f:
            json.dump({"stdout": stdout, "tensors": tensor_crcs(os.path.join(log_dir, final))}, f, indent=1)
        print(f"{name}: {len(stdout)} stdout lines, final {final}", flush=True)


def compare(a, b):
    same = True
    for name in sorted(d for d in os.listdir(a) if os.path.exists(os.path.join(a, d, "record.json"))
                       and os.path.exists(os.path.join(b, d, "record.json"))):
        with open(os.path.join(a, name, "log.txt"), "rb") as f:
            log_a = f.read()
        with open(os.path.join(b, name, "log.txt"), "rb") as f:
            log_b = f.read()
        with open(os.path.join(a, name, "record.json")) as f:
            rec_a = json.load(f)
        with open(os.path.join(b, name, "record.json")) as f:
            rec_b = json.load(f)
        checks = {"log.txt": log_a == log_b, "stdout": rec_a["stdout"] == rec_b["stdout"],
                  "tensors": rec_a["tensors"] == rec_b["tensors"]}
        same &= all(checks.values())
        print(f"{name:15s} " + " | ".join(f"{k} {'same' if v else 'DIFFERENT'}" for k, v in checks.items())
              + f" | {len(log_a.splitlines())} log lines, {len(rec_a['tensors'])} tensors")
    return same


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--repo", help="the checkout whose train_gpt2.py runs")
    p.add_argument("--out", help="a new folder for the records")
    p.add_argument("--only", nargs="*", help="these configs only")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two --out folders")
    args = p.parse_args(argv)
    if args.compare:
        sys.exit(0 if compare(*args.compare) else 1)
    if not args.repo or not args.out:
        p.error("pass --repo and --out, or --compare A B")
    record(os.path.abspath(args.repo), os.path.abspath(args.out), args.only)


if __name__ == "__main__":
    main()
