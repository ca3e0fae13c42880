"""
Times evaluation and inference on whatever device is present:
HellaSwag scoring one example at a time (build-nanogpt's way) vs packed batches, CORE scoring (core.py) the same
two ways on the tests' stand-in bundle, and sampling with vs without the KV cache. Predictions, CORE's counts and
samples are checked equal while timing.

    python benchmarks/eval_speed.py                                   # small random model, CPU-sized
    python benchmarks/eval_speed.py --size 124M --limit 0 --device cuda --dtype bf16   # full val set

Results measured so far are in benchmarks/README.md.
"""

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402
import hellaswag  # noqa: E402
from machinery.runtime import autodetect_device, synchronize  # noqa: E402
from train_gpt2 import GPT, GPTConfig  # noqa: E402

SIZES = {"small": dict(n_layer=4, n_head=4, n_embd=256), "124M": dict(n_layer=12, n_head=12, n_embd=768)}


def timed(fn, device_type):
    synchronize(device_type)
    t0 = time.time()
    out = fn()
    synchronize(device_type)
    return out, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="small", help="a randomly initialised GPT of this size")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    p.add_argument("--limit", type=int, default=500, help="HellaSwag examples (0: all 10,042)")
    p.add_argument("--batch_tokens", type=int, default=8192)
    p.add_argument("--compile", action="store_true", help="also time batched scoring with torch.compile")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--core_items", type=int, default=40, help="items per task of CORE's stand-in bundle (0: skip)")
    args = p.parse_args(argv)

    device = args.device or autodetect_device()
    device_type = device.split(":")[0]
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=50304, **SIZES[args.size])).to(device).eval()
    model = hellaswag.Model(gpt.hidden_states, gpt.logits, gpt.config.block_size)
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if args.dtype == "bf16" else None
    limit = args.limit or None
    name = torch.cuda.get_device_name() if device_type == "cuda" else platform.processor() or platform.machine()
    print(f"{time.strftime('%Y-%m-%d')} | {device} ({name}, {torch.get_num_threads()} threads) | torch "
          f"{torch.__version__} | GPT {args.size} {gpt.num_params(False) / 1e6:.0f}M random init | {args.dtype}")

    hellaswag.rendered_examples("val", 0, 1, limit, gpt.config.block_size, None)  # tokenize outside the timings
    runs = {}
    for label, batch_tokens, m in [("one at a time", 0, model), ("batched", args.batch_tokens, model)] + (
            [("batched+compile", args.batch_tokens,
              hellaswag.Model(torch.compile(gpt.hidden_states, dynamic=True), gpt.logits, gpt.config.block_size))]
            if args.compile else []):
        if label.endswith("compile"):  # the first call compiles: not part of the timing
            hellaswag.evaluate(m, device, limit=limit, batch_tokens=batch_tokens, autocast_ctx=autocast)
        runs[label] = timed(lambda: hellaswag.evaluate(m, device, limit=limit, batch_tokens=batch_tokens,
                                                       autocast_ctx=autocast), device_type)
    base, base_s = runs["one at a time"]
    for label, (r, sec) in runs.items():
        same = sum(r.predictions[i] == base.predictions[i] for i in base.predictions)
        print(f"HellaSwag {label:16s} {r.total:6d} examples {sec:8.2f} s  {r.total / sec:8.1f} ex/s  "
              f"x{base_s / sec:5.2f}  predictions equal to one-at-a-time: {same}/{r.total}")

    if args.core_items:
        core_speed(model, device, device_type, autocast, args)
    idx = torch.randint(0, 50257, (1, 8), device=device)
    ctx = autocast or contextlib.nullcontext()
    outs = {}
    for use_cache in (False, True):
        with ctx:
            gen = torch.Generator(device=device).manual_seed(1)
            outs[use_cache] = timed(lambda: gpt.generate(idx, args.new_tokens, top_k=50, generator=gen,
                                                         use_cache=use_cache), device_type)
    (a, t_off), (b, t_on) = outs[False], outs[True]
    print(f"sampling {args.new_tokens} new tokens: no cache {t_off:.2f} s, KV cache {t_on:.2f} s, "
          f"x{t_off / t_on:.1f}; same tokens: {torch.equal(a, b)}")


def core_speed(model, device, device_type, autocast, args):
    """CORE on tests/core_bundle.py's stand-in (5 tasks: 0- to 3-shot, every task type): items, rows and tokens
    per second one item at a time (nanochat's way) and batched. The whole bundle's time is its tokens over the
    batched rate."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from core_bundle import write_bundle  # (tests/, on the path only for this: the stand-in bundle's writer)

    path = write_bundle(os.path.join(tempfile.mkdtemp(), "eval_bundle.zip"), n=args.core_items)
    tasks = core.rendered_tasks(path, False, None, 0, 1, model.max_len)  # tokenized outside the timings
    rows = [r for _, _, mine in tasks for _, item_rows in mine for r in item_rows]
    items, tokens = sum(len(mine) for _, _, mine in tasks), sum(len(r.tokens) for r in rows)
    runs = {}
    for label, batch_tokens in [("one at a time", 0), ("batched", args.batch_tokens)]:
        runs[label] = timed(lambda: core.evaluate(model, device, path, False, batch_tokens=batch_tokens,
                                                  autocast_ctx=autocast), device_type)
    (base, base_s), (batched, sec) = runs["one at a time"], runs["batched"]
    same = [s.correct for s in base] == [s.correct for s in batched]
    print(f"CORE stand-in {items} items, {len(rows)} rows, {tokens:,} tokens: one at a time {base_s:.2f} s "
          f"({items / base_s:.1f} items/s), batched {sec:.2f} s ({items / sec:.1f} items/s, {tokens / sec:,.0f} "
          f"tokens/s) x{base_s / sec:.2f}; counts equal: {same}")


if __name__ == "__main__":
    main()
