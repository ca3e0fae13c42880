"""
HellaSwag (Zellers et al. 2019): pick the right one of four endings for a context.

A language model scores each ending by the mean loss of its tokens after the context;
the lowest wins ("acc_norm", the number GPT-2 and GPT-3 papers quote; "acc" uses the sum).

    python hellaswag.py -m gpt2                   # OpenAI's GPT-2 124M through transformers
    python hellaswag.py -m log/model_19072.pt     # a checkpoint of train_gpt2.py

The val set is downloaded once into --cache_dir (or $HELLASWAG_CACHE_DIR, default ./hellaswag
next to this file).
"""

import contextlib
import functools
import json
import os
import sys
import time
from collections import namedtuple

import torch
import torch.distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from machinery import checkpoints, common, hf_convert, runtime

URLS = {
    "train": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_train.jsonl",
    "val": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "test": "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_test.jsonl",
}


# HellaSwag's own val file (rowanz/hellaswag data/hellaswag_val.jsonl): its size and sha256, which tell it from a
# stand-in (a cleaned copy, a subset) on which accuracies do not compare with published ones
REAL_VAL_FILE = (12246618, "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588")


def default_cache_dir():
    return os.environ.get("HELLASWAG_CACHE_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                 "hellaswag")


def download(split, cache_dir=None):
    """Download one split of HellaSwag (once) and return the path of its .jsonl."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"hellaswag_{split}.jsonl")
    if not os.path.exists(path):
        print(f"downloading HellaSwag {split} to {path}")
        try:
            common.download_file(URLS[split], path)
        except common.UserError as e:
            raise common.UserError(f"{e} (or set HELLASWAG_CACHE_DIR to a folder holding hellaswag_{split}.jsonl)") \
                from None
    return path


def not_the_real_val_set(cache_dir=None):
    """A note when the cache's val file is not HellaSwag's own (its size or sha256 differs); None when it is,
    or when there is none yet."""
    path = os.path.join(cache_dir or default_cache_dir(), "hellaswag_val.jsonl")
    if not os.path.exists(path):
        return None
    if os.path.getsize(path) == REAL_VAL_FILE[0] and \
            common.file_sha256(path, os.path.getmtime(path)) == REAL_VAL_FILE[1]:
        return None
    return f"{path} is not HellaSwag's own val file (its size or sha256 differs): accuracies on it do not compare " \
           "with published ones"


def iterate_examples(split, cache_dir=None):
    """Yield the examples of a split as dicts with `ctx`, `endings` (4) and `label`. A damaged file (cut
    short, empty, an error page saved in its place) is a one-line error that says to delete it."""
    path = download(split, cache_dir)
    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            try:
                example = json.loads(line)
                if len(example["endings"]) != 4 or not isinstance(example["ctx"], str):
                    raise ValueError("not a HellaSwag example")
                example["label"]
            except (ValueError, KeyError, TypeError) as e:
                raise common.UserError(f"{path} is damaged at line {n} ({type(e).__name__}); delete it, and it is "
                                "downloaded again") from None
            yield example
    if n == 0:
        raise common.UserError(f"{path} is empty; delete it, and it is downloaded again")


def render_example(example):
    """
    Returns (data, tokens, mask, label): tokens (4, max_len) holds context + ending for each
    candidate, zero-padded on the right; mask is 1 on the ending tokens, the ones scored.
    """
    enc = common.get_encoder()
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


def completion_losses(tokens, mask, logits):
    """
    The scoring rule: for each row, the total and the mean cross-entropy of its ending tokens
    (mask 1) given everything before them. Returns (sum_loss, avg_loss), each of shape (rows,).
    """
    shift_logits = logits[:, :-1, :].float()  # position t predicts token t+1
    shift_tokens = tokens[:, 1:]
    losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_tokens.reshape(-1),
                             reduction="none").view(tokens.size(0), -1)
    shift_mask = mask[:, 1:].to(losses.dtype)
    sum_loss = (losses * shift_mask).sum(dim=1)
    return sum_loss, sum_loss / shift_mask.sum(dim=1)


def score_endings(tokens, mask, logits):
    """One example's (pred, pred_norm): the row with the lowest total loss, and with the lowest mean loss."""
    sum_loss, avg_loss = completion_losses(tokens, mask, logits)
    return sum_loss.argmin().item(), avg_loss.argmin().item()


def scored_position_losses(model, tokens, mask):
    """
    The same (sum_loss, avg_loss) as completion_losses(tokens, mask, logits of the whole batch), but
    lm_head runs only where an ending token is predicted: the context's logits are never needed.
    """
    hidden = model.hidden(tokens)
    scored = mask[:, 1:].bool()  # position t predicts token t+1
    logits = model.head(hidden[:, :-1][scored]).float()
    losses = F.cross_entropy(logits, tokens[:, 1:][scored], reduction="none")
    rows = torch.arange(tokens.size(0), device=tokens.device).unsqueeze(1).expand_as(scored)[scored]
    sum_loss = torch.zeros(tokens.size(0), device=tokens.device).index_add_(0, rows, losses)
    return sum_loss, sum_loss / scored.sum(dim=1)


# reference points per GPT-2 size, (n_layer, n_embd) -> baselines (sources in the README): OpenAI's GPT-2
# checkpoint's HellaSwag acc_norm and its val loss on FineWeb, as llm.c's dev/vislog.ipynb has them (124M's
# HellaSwag is build-nanogpt's figure too), its val loss on FineWeb-Edu where build-nanogpt measured one
# (124M), and the GPT-3 paper's HellaSwag for the nearest GPT-3 size
GPT2_SIZES = {
    (12, 768): dict(name="124M", hella=0.294463, fineweb_edu=3.2924, fineweb=3.424958, gpt3=("Small, 125M", 0.337),
                    core=0.1139),
    (24, 1024): dict(name="355M", hella=0.375224, fineweb_edu=None, fineweb=3.083089, gpt3=("Medium, 350M", 0.436),
                     core=0.1849),
    (36, 1280): dict(name="774M", hella=0.431986, fineweb_edu=None, fineweb=3.000580, gpt3=("Large, 760M", 0.510),
                     core=0.2146),
    (48, 1600): dict(name="1558M", hella=0.488946, fineweb_edu=None, fineweb=2.831273, gpt3=("XL, 1.3B", 0.547),
                     core=0.256525),
}
VAL_EXAMPLES = 10042  # in HellaSwag's val split


def gpt2_baselines(n_layer, n_embd):
    """GPT2_SIZES' entry for a model of these layers and width, or None when it is not one of GPT-2's sizes."""
    return GPT2_SIZES.get((n_layer, n_embd))


def baselines_line(shape):
    """What OpenAI's models of this GPT-2 size scored (shape: (n_layer, n_embd)), or None for other shapes."""
    size = gpt2_baselines(*shape) if shape else None
    if size is None:
        return None
    gpt3, gpt3_hella = size["gpt3"]
    return (f"for comparison, on all {VAL_EXAMPLES:,} val examples: OpenAI's GPT-2 {size['name']} acc_norm "
            f"{size['hella']:.4f} (llm.c's measurement), GPT-3 {gpt3} {gpt3_hella:.3f} (its paper)")


# A language model as scoring needs it: hidden(tokens) -> (B, T, C) states, head(states) -> logits,
# the longest sequence it takes, and its (n_layer, n_embd) when known (to name
# the GPT-2 size it has).
Model = namedtuple("Model", "hidden head max_len shape", defaults=(None,))
Result = namedtuple("Result", "correct_norm correct total predictions")  # predictions: {index: (pred, pred_norm)}


@functools.lru_cache(maxsize=4)
def rendered_examples(split, rank, world_size, limit, max_len, cache_dir):
    """This rank's examples i % world_size == rank (of the first `limit`) as (i, tokens, mask, label).
    Rows longer than max_len (the model's block_size) lose their first tokens, from the context; at
    GPT-2's 1024 no val example is that long. Cached: training evaluates the same examples many times."""
    out = []
    for i, example in enumerate(iterate_examples(split, cache_dir)):
        if limit is not None and i >= limit:
            break
        if i % world_size == rank:
            _, tokens, mask, label = render_example(example)
            out.append((i, tokens[:, -max_len:], mask[:, -max_len:], label))
    return tuple(out)


def pack(examples, batch_tokens):
    """Group examples of similar length, each group's 4 x n x width within batch_tokens (0: one per group)."""
    if not batch_tokens:
        return [[e] for e in examples]
    groups, group = [], []
    for e in sorted(examples, key=lambda e: e[1].size(1)):  # sorted by length: little padding
        if group and 4 * (len(group) + 1) * e[1].size(1) > batch_tokens:
            groups.append(group)
            group = []
        group.append(e)
    return groups + [group] if group else groups


@torch.no_grad()
def evaluate(model, device, split="val", rank=0, world_size=1, limit=None, batch_tokens=8192,
             autocast_ctx=None, cache_dir=None, progress=False):
    """
    Score this rank's share of the examples (i % world_size == rank); returns its counts, to be
    summed across ranks. With batch_tokens, many examples go through the model at once (padded on
    the right, which causal attention never looks at); with 0, one example per forward pass and full
    logits, build-nanogpt's way. Both give the same predictions.
    """
    examples = rendered_examples(split, rank, world_size, limit, model.max_len, cache_dir)
    predictions = {}
    correct_norm = correct = 0
    t0 = time.time()
    for n, group in enumerate(tqdm(pack(examples, batch_tokens), disable=not progress, desc="HellaSwag")):
        if progress and n == 1:  # the first batch done: say up front when the whole will take minutes
            announce(len(examples), len(predictions), time.time() - t0, limit)
        width = max(e[1].size(1) for e in group)
        tokens = torch.cat([F.pad(e[1], (0, width - e[1].size(1))) for e in group]).to(device)
        mask = torch.cat([F.pad(e[2], (0, width - e[2].size(1))) for e in group]).to(device)
        with autocast_ctx or contextlib.nullcontext():
            if batch_tokens:
                sum_loss, avg_loss = scored_position_losses(model, tokens, mask)
            else:
                sum_loss, avg_loss = completion_losses(tokens, mask, model.head(model.hidden(tokens)))
        preds = sum_loss.view(-1, 4).argmin(dim=1).tolist()
        preds_norm = avg_loss.view(-1, 4).argmin(dim=1).tolist()
        for (i, _, _, label), pred, pred_norm in zip(group, preds, preds_norm):
            predictions[i] = (pred, pred_norm)
            correct += int(pred == label)
            correct_norm += int(pred_norm == label)
    return Result(correct_norm, correct, len(examples), predictions)


def announce(total, done, seconds, limit):
    """One line when scoring `total` examples at the speed of the first `done` will take a minute or more."""
    projected = seconds / done * total
    if projected >= 60:
        print(f"HellaSwag: {total:,} examples, about {projected / 60:.0f} min at the first {done}'s speed"
              + ("" if limit else "; --limit N scores the first N only (e.g. --limit 1000 for a quick estimate)"),
              flush=True)


def load_model(name_or_path, device, compile=False):
    """A train_gpt2.py checkpoint (.pt, or a sharded folder) or a transformers GPT-2 (hub name or directory) as a
    Model."""
    if checkpoints.is_checkpoint(name_or_path):
        # imported here, not at the top: train_gpt2 imports this file for its evaluation (a cycle)
        import train_gpt2

        gpt = train_gpt2.GPT.from_pretrained(name_or_path).to(device).eval()
        hidden, head, max_len = gpt.hidden_states, gpt.logits, gpt.config.block_size
        shape = gpt.config.n_layer, gpt.config.n_embd
    else:
        # GPT-2 or Llama: base_model is the stack below the head
        hf = hf_convert.load_hf_model(name_or_path).to(device).eval()
        hidden, head, max_len = (lambda tokens: hf.base_model(tokens).last_hidden_state), hf.lm_head, \
            hf.config.max_position_embeddings
        shape = getattr(hf.config, "n_layer", None), getattr(hf.config, "n_embd", None)  # (GPT-2's config names)
    if compile:
        hidden = torch.compile(hidden, dynamic=True)  # batch shapes vary: one graph for all of them
    return Model(hidden, head, max_len, shape)


def main(argv=None):
    p = common.ArgumentParser(description="Score a GPT-2 model on HellaSwag (under torchrun: split across ranks).")
    p.add_argument("-m", "--model", default="gpt2",
                   help="gpt2 / gpt2-medium / ..., a transformers directory, or a train_gpt2.py .pt checkpoint")
    p.add_argument("-d", "--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("-s", "--split", default="val", choices=["val", "train"], help="the test split has no labels")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--batch_tokens", type=int, default=8192,
                   help="tokens per forward pass, many examples at once (0: one example at a time)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="default: bf16 on CUDA GPUs that compute it natively, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cache_dir", default=None, help="where the .jsonl files live (default $HELLASWAG_CACHE_DIR "
                                                      "or ./hellaswag)")
    args = p.parse_args(argv)
    if args.batch_tokens < 0 or (args.limit is not None and args.limit <= 0):
        p.error("--batch_tokens must be >= 0 and --limit positive")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        device, autocast_ctx = runtime.scoring_device(args.device, args.dtype)
        for _ in iterate_examples(args.split, args.cache_dir):  # the data first: quicker to find missing or damaged
            pass
        model = load_model(args.model, device, args.compile)
        if world_size > 1:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        t0 = time.time()
        r = evaluate(model, device, split=args.split, rank=rank, world_size=world_size, limit=args.limit,
                     batch_tokens=args.batch_tokens, autocast_ctx=autocast_ctx, cache_dir=args.cache_dir,
                     progress=rank == 0)
        counts = torch.tensor([r.correct_norm, r.correct, r.total], device=device)
        if world_size > 1:
            dist.all_reduce(counts)
            dist.barrier()  # tear down together, as train_gpt2.py does
            dist.destroy_process_group()
    except common.UserError as e:
        sys.exit(f"hellaswag.py: error: {e}")
    correct_norm, correct, total = counts.tolist()
    if rank == 0:
        print(f"{args.model}: {total} examples | acc {correct / total:.4f} | acc_norm {correct_norm / total:.4f} "
              f"| {time.time() - t0:.1f} s")
        if args.split == "val" and (note := not_the_real_val_set(args.cache_dir)):
            print(f"note: {note}")
        elif args.split == "val" and (line := baselines_line(model.shape)):
            print(line)


if __name__ == "__main__":
    # train_gpt2 (which a .pt model needs) imports this file by name: let it find this copy, not load a second
    sys.modules.setdefault("hellaswag", sys.modules[__name__])
    common.run_main(main)
