"""
Shard writing speed: fineweb.py (batched tasks over all cores) against a plain one-process loop
(encode each document, append, write shards) on the same corpus. Both write the same bytes; the
script checks that.

    python benchmarks/fineweb_speed.py                       # the novels corpus in ../shared/data
    python benchmarks/fineweb_speed.py --dataset my.jsonl --num_proc 8

Results measured so far are in benchmarks/README.md.
"""

import argparse
import filecmp
import glob
import os
import sys
import tempfile
import time

import numpy as np
import tiktoken

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fineweb  # noqa: E402

NOVELS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                      "data", "novels", "english_novels_95.jsonl.xz")


def plain_loop(args, out_dir):
    """The simplest correct writer: one process, one document at a time."""
    enc = tiktoken.get_encoding("gpt2")
    texts, _ = fineweb.load_documents(argparse.Namespace(dataset=args.dataset, streaming=False, text_column="text",
                                                         remote_name=None, out_dir=out_dir), skip=0)
    t0 = time.time()
    writer = fineweb.ShardWriter(out_dir, "edufineweb", args.shard_size, "npy", 0, 0, lambda *state: None)
    for text in texts:
        tokens = np.array([enc.eot_token] + enc.encode_ordinary(text), dtype=np.uint16)
        writer.add(tokens, np.array([len(tokens)]))
    writer.close()
    return writer.tokens_written, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=NOVELS)
    p.add_argument("--shard_size", type=int, default=10_000_000)
    p.add_argument("--num_proc", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ours, plain = os.path.join(tmp, "ours"), os.path.join(tmp, "plain")
        os.makedirs(plain)
        fineweb.load_documents(argparse.Namespace(dataset=args.dataset, streaming=False, text_column="text",
                                                  remote_name=None, out_dir=tmp), skip=0)  # warm the cache
        n, t_plain = plain_loop(args, plain)
        t0 = time.time()
        fineweb.main(["--dataset", args.dataset, "--out_dir", ours, "--shard_size", str(args.shard_size),
                      "--num_proc", str(args.num_proc)])
        t_ours = time.time() - t0
        names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(plain, "*.npy")))
        same = all(filecmp.cmp(os.path.join(plain, f), os.path.join(ours, f), shallow=False) for f in names)
    print(f"{time.strftime('%Y-%m-%d')} | {os.cpu_count()} cores | {n:,} tokens")
    print(f"plain one-process loop (tokenize + write):   {t_plain:6.2f} s  {n / t_plain / 1e6:6.2f}M tokens/s")
    print(f"fineweb.py --num_proc {args.num_proc} (whole command):  {t_ours:6.2f} s  {n / t_ours / 1e6:6.2f}M tokens/s"
          f"  x{t_plain / t_ours:.2f}")
    print(f"identical shards: {same}")


if __name__ == "__main__":
    main()
