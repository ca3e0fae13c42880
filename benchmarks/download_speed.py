"""
`fineweb.py --pretokenized` against the stand-in hub on 127.0.0.1 (tests/hub_server.py): download rate with
several files at once against one at a time, the cost of checking a shard, and the arithmetic of download
against tokenizing for 10B tokens.

    python benchmarks/download_speed.py                      # 4 shards of 100M tokens (200 MB each), in /tmp
    python benchmarks/download_speed.py --tokens 10000000    # smaller shards

Loopback is not a network: the rates say what the client and the checks cost, not what a link gives.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)
from hub_server import HubServer, write_bin_shard  # noqa: E402

from machinery import common  # noqa: E402


def timed_download(server, out_dir, jobs):
    env = dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_PROGRESS_BARS="1")
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(REPO, "fineweb.py"), "--pretokenized", "bench/shards", "--out_dir",
                    out_dir, "--jobs", str(jobs)], env=env, check=True, capture_output=True)
    return time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--shards", type=int, default=4, help="train shards (plus the val shard)")
    p.add_argument("--tokenize_rate", type=float, default=8.8e6,
                   help="fineweb.py's measured tokens/s (benchmarks/README.md: 2 cores, the novels)")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="download_speed_")
    try:
        tokens = np.random.default_rng(0).integers(0, 50257, args.tokens).astype(np.uint16)
        for i in range(args.shards + 1):
            write_bin_shard(os.path.join(work, "hub", "bench", "shards",
                                         f"bench_{'val' if i == 0 else 'train'}_{i:06d}.bin"), tokens)
        total = (args.shards + 1) * (1024 + 2 * args.tokens)
        with HubServer(os.path.join(work, "hub")) as server:
            for jobs in (1, args.shards + 1):
                seconds = timed_download(server, os.path.join(work, f"out{jobs}"), jobs)
                print(f"--jobs {jobs}: {total / 1e6:,.0f} MB in {seconds:.2f} s = {total / seconds / 1e6:,.0f} MB/s "
                      "(the whole command, loopback)")
        path = os.path.join(work, "out1", "bench_train_000001.bin")
        t0 = time.time()
        for _ in range(10):
            common.bin_shard_problem(path)
            common.file_fingerprint(path)
        print(f"checking one {os.path.getsize(path) / 1e6:,.0f} MB shard (header, size, fingerprint): "
              f"{(time.time() - t0) / 10 * 1000:.2f} ms")
    finally:
        shutil.rmtree(work)
    size_10b = 10e9 * 2
    print(f"10B tokens = {size_10b / 1e9:.0f} GB: {size_10b * 8 / 1e9 / 60:.1f} min at 1 Gbit/s; tokenizing at "
          f"{args.tokenize_rate / 1e6:.1f}M tokens/s: {10e9 / args.tokenize_rate / 60:.0f} min, plus the text's "
          "download")


if __name__ == "__main__":
    main()
