"""
HellaSwag (Zellers et al. 2019): pick the right one of four endings for a context.

A language model scores each ending by the mean loss of its tokens after the context;
the lowest wins ("acc_norm", the number GPT-2 and GPT-3 papers quote; "acc" uses the sum).

    python hellaswag.py -m gpt2                   # OpenAI's GPT-2 124M through transformers
    python hellaswag.py -m log/model_19072.pt     # a checkpoint of train_gpt2.py

The val set is downloaded once into --cache_dir (or $HELLASWAG_CACHE_DIR, default ./hellaswag
next to this file).
"""

import argparse
import functools
import json
import os
import sys
from collections import namedtuple

import requests
import torch
from torch.nn import functional as F
from tqdm import tqdm

URLS = {
    "train": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl",
    "val": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "test": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_test.jsonl",
}


class HellaSwagError(Exception):
    """The data could not be had; the message says where to put it."""


@functools.lru_cache(maxsize=None)
def get_encoder():
    """GPT-2's BPE through tiktoken, loaded on first use (it may need the network once)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises plain requests/OS errors when its files cannot be fetched
        raise HellaSwagError(f"could not load the GPT-2 tokenizer with tiktoken ({type(e).__name__}); connect "
                             "once to cache it, or set TIKTOKEN_CACHE_DIR to a folder holding its files") from None


def default_cache_dir():
    return os.environ.get("HELLASWAG_CACHE_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                 "hellaswag")


def download_file(url, path, chunk_size=1 << 20):
    """Stream `url` into a temporary file next to `path`, then rename: `path` is complete or absent."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with requests.get(url, stream=True, timeout=30) as resp:
            resp.raise_for_status()
            total = int(resp.headers.get("content-length", 0)) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="iB", unit_scale=True, desc=os.path.basename(path)) as bar:
                for chunk in resp.iter_content(chunk_size=chunk_size):
                    bar.update(f.write(chunk))
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise HellaSwagError(f"could not download {url} ({type(e).__name__}); fetch it yourself and place it "
                             f"at {path} (or set HELLASWAG_CACHE_DIR)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download(split, cache_dir=None):
    """Download one split of HellaSwag (once) and return the path of its .jsonl."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    if not os.path.exists(path):
        print(f"downloading HellaSwag {split} to {path}")
        download_file(URLS[split], path)
    return path


def iterate_examples(split, cache_dir=None):
    """Yield the examples of a split as dicts with `ctx`, `endings` (4) and `label`."""
    with open(download(split, cache_dir)) as f:
        for line in f:
            yield json.loads(line)


def render_example(example):
    """
    Returns (data, tokens, mask, label): tokens (4, max_len) holds context + ending for each
    candidate, zero-padded on the right; mask is 1 on the ending tokens, the ones scored.
    """
    enc = get_encoder()
    ctx_tokens = enc.encode(example["ctx"])
    data = {"label": example["label"], "ctx_tokens": ctx_tokens, "ending_tokens": []}
    rows, masks = [], []
    for ending in example["endings"]:
        end_tokens = enc.encode(" " + ending)  # GPT-2's tokens carry their leading space
        rows.append(ctx_tokens + end_tokens)
        masks.append([0] * len(ctx_tokens) + [1] * len(end_tokens))
        data["ending_tokens"].append(end_tokens)
    max_len = max(len(row) for row in rows)
    tokens = torch.zeros((4, max_len), dtype=torch.long)
    mask = torch.zeros((4, max_len), dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks)):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(m)] = torch.tensor(m)
    return data, tokens, mask, example["label"]


def score_endings(tokens, mask, logits):
    """
    The scoring rule, shared by training and this script. Returns (pred, pred_norm): the row with
    the lowest total loss over its ending tokens, and the one with the lowest mean loss.
    """
    shift_logits = logits[:, :-1, :].float()  # position t predicts token t+1
    shift_tokens = tokens[:, 1:]
    losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_tokens.reshape(-1),
                             reduction="none").view(tokens.size(0), -1)
    shift_mask = mask[:, 1:].to(losses.dtype)
    sum_loss = (losses * shift_mask).sum(dim=1)
    avg_loss = sum_loss / shift_mask.sum(dim=1)
    return sum_loss.argmin().item(), avg_loss.argmin().item()


Result = namedtuple("Result", "correct_norm correct total")


@torch.no_grad()
def evaluate(logits_fn, device, split="val", rank=0, world_size=1, limit=None, max_len=None,
             autocast_ctx=None, cache_dir=None, progress=False):
    """
    Score examples i with i % world_size == rank (of the first `limit`, if given) with
    `logits_fn(tokens) -> logits`; returns this rank's counts, to be summed across ranks.
    Rows longer than `max_len` (the model's block_size) lose their first tokens, from the
    context; at GPT-2's 1024 no val example is that long.
    """
    correct_norm = correct = total = 0
    examples = iterate_examples(split, cache_dir)
    for i, example in enumerate(tqdm(examples, total=limit, disable=not progress, desc="HellaSwag")):
        if limit is not None and i >= limit:
            break
        if i % world_size != rank:
            continue
        _, tokens, mask, label = render_example(example)
        if max_len is not None and tokens.size(1) > max_len:
            tokens, mask = tokens[:, -max_len:], mask[:, -max_len:]
        tokens, mask = tokens.to(device), mask.to(device)
        if autocast_ctx is not None:
            with autocast_ctx:
                logits = logits_fn(tokens)
        else:
            logits = logits_fn(tokens)
        pred, pred_norm = score_endings(tokens, mask, logits)
        correct += int(pred == label)
        correct_norm += int(pred_norm == label)
        total += 1
    return Result(correct_norm, correct, total)


def load_model(name_or_path, device):
    """A train_gpt2.py checkpoint (.pt) or a transformers GPT-2 (hub name or directory) -> (logits_fn, max_len)."""
    from train_gpt2 import load_hf_gpt2, load_model_checkpoint

    if name_or_path.endswith(".pt"):
        model = load_model_checkpoint(name_or_path, device).eval()
        return (lambda tokens: model(tokens)[0]), model.config.block_size
    model = load_hf_gpt2(name_or_path).to(device).eval()
    return (lambda tokens: model(tokens).logits), model.config.n_positions


def main(argv=None):
    p = argparse.ArgumentParser(description="Score a GPT-2 model on HellaSwag.")
    p.add_argument("-m", "--model", default="gpt2",
                   help="gpt2 / gpt2-medium / ..., a transformers directory, or a train_gpt2.py .pt checkpoint")
    p.add_argument("-d", "--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("-s", "--split", default="val", choices=["val", "train"], help="the test split has no labels")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--cache_dir", default=None, help="where the .jsonl files live (default $HELLASWAG_CACHE_DIR "
                                                      "or ./hellaswag)")
    args = p.parse_args(argv)
    from train_gpt2 import UserError, autodetect_device

    device = args.device or autodetect_device()
    try:
        download(args.split, args.cache_dir)  # the data first: it is the quicker thing to find missing
        logits_fn, max_len = load_model(args.model, device)
        r = evaluate(logits_fn, device, split=args.split, limit=args.limit, max_len=max_len,
                     cache_dir=args.cache_dir, progress=True)
    except (HellaSwagError, UserError) as e:
        sys.exit(f"hellaswag.py: error: {e}")
    print(f"{args.model}: {r.total} examples | acc {r.correct / r.total:.4f} | acc_norm {r.correct_norm / r.total:.4f}")


if __name__ == "__main__":
    main()
