"""
CORE (DCLM, Li et al. 2024): a language model's accuracy on 22 in-context-learning tasks, each centred on its
random baseline, then averaged. nanochat's "time to GPT-2" leaderboard is judged by it; this file measures it
the way nanochat's base_eval.py does (the same prompts, few-shot draws, cropping and centring), so a run here
can stand beside nanochat's figures.

    python core.py -m gpt2                                   # OpenAI's GPT-2 124M: 0.1139 in nanochat's measurement
    python core.py -m log/model_19072.pt --max_per_task 100  # a checkpoint of train_gpt2.py, a quick estimate
    torchrun --standalone --nproc_per_node=8 core.py -m log/model_19072.pt   # the examples split across GPUs

The tasks come from nanochat's eval bundle, a zip downloaded once into --cache_dir (or $CORE_CACHE_DIR, default
./core_bundle next to this file), checked against its sha256, and read in place.
"""

import contextlib
import csv
import functools
import io
import json
import os
import random
import sys
import time
import zipfile
import zlib
from collections import namedtuple

import torch
import torch.distributed as dist
import yaml  # core.yaml; PyYAML comes with transformers and datasets (listed in requirements.txt all the same)
from torch.nn import functional as F

import hellaswag
from machinery import common, runtime

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# the sha256 of that zip as nanochat's users have pinned it (several public repositories agree on it); the bundle
# is about 160 MB and holds 91,037 examples
BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
BUNDLE_NAME = "eval_bundle.zip"
TRUSTED_COPY = "core.py --bundle PATH, train_gpt2.py --core_bundle PATH"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
EOT = 50256  # GPT-2's <|endoftext|>: nanochat puts it before every prompt (its BOS), and pads with it
VOCAB = 50257  # the tokenizer's ids: logits past them (train_gpt2.py's padding to 50304) are cut off, as nanochat does

# one task of core.yaml; baseline: the accuracy of random guessing, in percent (eval_meta_data.csv's)
Task = namedtuple("Task", "label kind shots delimiter uri baseline")
# a scored sequence: tokens[start:end] are the continuation, each predicted from the tokens before it
Row = namedtuple("Row", "tokens start end")
Score = namedtuple("Score", "task examples correct")  # one task's result: correct out of examples


# -----------------------------------------------------------------------------
# The bundle: nanochat's zip of core.yaml, eval_meta_data.csv and eval_data/<category>/<task>.jsonl


def default_cache_dir():
    return os.environ.get("CORE_CACHE_DIR") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "core_bundle")


def bundle_path(bundle=None, cache_dir=None):
    """(path, official): a zip the user named (scored as it is), or nanochat's, downloaded once into the cache and
    checked against its sha256."""
    if bundle:
        if not os.path.isfile(bundle):
            raise common.UserError(f"no CORE bundle at {bundle}; pass the path of an eval_bundle.zip, or leave the "
                                   "flag out to download nanochat's")
        return bundle, False
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, BUNDLE_NAME)
    if not os.path.exists(path):
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError as e:
            raise common.UserError(f"cannot create {cache_dir} ({e.strerror}); set CORE_CACHE_DIR to a folder you "
                                   "can write") from None
        print(f"downloading nanochat's CORE eval bundle to {path}")
        try:
            common.download_file(BUNDLE_URL, path)
        except common.UserError as e:
            raise common.UserError(f"{e} (or set CORE_CACHE_DIR to a folder holding {BUNDLE_NAME})") from None
        if common.file_sha256(path, os.path.getmtime(path)) != BUNDLE_SHA256:
            os.remove(path)  # an error page or a changed bundle: never kept, so the next run downloads again
            raise common.UserError(f"the file downloaded from {BUNDLE_URL} is not nanochat's eval bundle (its sha256 "
                                   f"differs; removed); try again later, or score a copy you trust as it is: "
                                   f"{TRUSTED_COPY}")
    return path, True


def read_bundle(path, official):
    """The bundle's tasks (core.yaml's order) and their examples as {label: (item, ...)}. Every fault is one line:
    a zip cut short or damaged, a missing file, an unknown task type, a line that is not JSON. Parsed once per
    file: core.py checks the data before it loads the model, then scores it."""
    stat = os.stat(path)
    return parsed_bundle(path, official, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def parsed_bundle(path, official, mtime_ns, size):
    """read_bundle's work; a file replaced at the same path (another mtime or size) is read again."""
    if official and common.file_sha256(path, os.path.getmtime(path)) != BUNDLE_SHA256:
        raise common.UserError(f"{path} is damaged (its sha256 is not that of nanochat's eval bundle); delete it, "
                               f"and it is downloaded again (or score a copy you trust as it is: {TRUSTED_COPY})")
    fix = "delete it, and it is downloaded again" if official else "pass a whole eval_bundle.zip"
    try:
        with zipfile.ZipFile(path) as z:
            root = bundle_root(z, path)
            config = yaml.safe_load(z.read(root + "core.yaml"))
            meta = csv.DictReader(io.StringIO(z.read(root + "eval_meta_data.csv").decode("utf-8")))
            baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in meta}
            tasks = [parse_task(t, baselines, path) for t in config["icl_tasks"]]
            return tuple(tasks), {t.label: tuple(read_task_file(z, root, t, path)) for t in tasks}
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:  # EOFError, zlib: a member damaged
        raise common.UserError(f"{path} is not a whole zip ({common.first_line(e)}); {fix}") from None
    except (yaml.YAMLError, KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise common.UserError(f"{path}: core.yaml or eval_meta_data.csv is not as nanochat's bundle has it "
                               f"({type(e).__name__}: {common.first_line(e)}); {fix}") from None


def bundle_root(z, path):
    """The folder inside the zip that holds core.yaml (nanochat's: eval_bundle/)."""
    for name in z.namelist():
        if name == "core.yaml" or name.endswith("/core.yaml"):
            return name[:-len("core.yaml")]
    raise common.UserError(f"{path} has no core.yaml: it is not a CORE eval bundle")


def parse_task(entry, baselines, path):
    """One core.yaml entry as a Task; an unknown type or a task without a random baseline is refused."""
    label, kind = entry["label"], entry["icl_task_type"]
    if kind not in TASK_TYPES:
        raise common.UserError(f"{path}: task {label} has type {kind!r}, which CORE does not score (it scores "
                               f"{', '.join(TASK_TYPES)})")
    if label not in baselines:
        raise common.UserError(f"{path}: task {label} has no random baseline in eval_meta_data.csv")
    return Task(label, kind, int(entry["num_fewshot"][0]), entry.get("continuation_delimiter", " "),
                entry["dataset_uri"], baselines[label])


def read_task_file(z, root, task, path):
    name = f"{root}eval_data/{task.uri}"
    try:
        lines = z.read(name).decode("utf-8").splitlines()
    except KeyError:
        raise common.UserError(f"{path} has no {name} (task {task.label}): the bundle is incomplete") from None
    items = []
    for n, line in enumerate(lines, start=1):
        try:
            items.append(json.loads(line.strip()))
        except ValueError:
            raise common.UserError(f"{path}: {name} line {n} is not JSON: the bundle is damaged") from None
    return items


def task_examples(items, max_per_task):
    """nanochat's order: shuffled with a fixed seed, then the first max_per_task (None: all)."""
    items = list(items)
    random.Random(1337).shuffle(items)
    return items[:max_per_task] if max_per_task else items


# -----------------------------------------------------------------------------
# Prompts: nanochat's templates, its few-shot draws and its scored spans, written out


def fewshot_examples(data, idx, shots):
    """`shots` other items of the task, drawn with a generator seeded by the item's index (never the item itself)."""
    if shots == 0:
        return []
    rng = random.Random(1234 + idx)
    return [data[i] for i in rng.sample([i for i in range(len(data)) if i != idx], shots)]


def render_prompts(kind, item, fewshot, delim):
    """The texts scored for one item: a prompt per choice (multiple choice), per context (schema), or the prompt
    without and with its continuation (language modelling). Each few-shot example ends in a blank line."""
    if kind == "multiple_choice":  # the same question, each choice after it
        shots = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delim}{choice}" for choice in item["choices"]]
    if kind == "schema":  # each context, the same continuation after it
        shots = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{delim}{item['continuation']}" for context in item["context_options"]]
    shots = "".join(f"{str(ex['context']).strip()}{delim}{ex['continuation']}\n\n" for ex in fewshot)
    prompt = f"{shots}{str(item['context']).strip()}{delim}"
    # stripped: a trailing space would merge into the continuation's first token, and the prompt's tokens would
    # not be a prefix of the whole's
    return [prompt.strip(), f"{prompt}{item['continuation']}"]


def common_length(seqs):
    """How many leading tokens all the sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def example_rows(task, data, idx, enc, max_len):
    """One item's rows: EOT and the prompt's tokens, the span to score found in token space (multiple choice:
    after the choices' common prefix; schema: the contexts' common suffix; language modelling: after the prompt),
    and a row longer than max_len cropped from the left, as nanochat does."""
    texts = render_prompts(task.kind, data[idx], fewshot_examples(data, idx, task.shots), task.delimiter)
    seqs = [[EOT] + enc.encode_ordinary(text) for text in texts]
    if task.kind == "multiple_choice":
        start = common_length(seqs)
        spans = [(start, len(s)) for s in seqs]
    elif task.kind == "schema":
        suffix = common_length([s[::-1] for s in seqs])
        spans = [(len(s) - suffix, len(s)) for s in seqs]
    else:
        without, seqs = seqs[0], seqs[1:]
        if len(without) >= len(seqs[0]) or seqs[0][:len(without)] != without:
            raise ValueError(f"{task.label} item {idx}: the prompt's tokens are not a prefix of the whole's")
        spans = [(len(without), len(seqs[0]))]
    rows = []
    for s, (start, end) in zip(seqs, spans):
        crop = max(0, len(s) - max_len)
        if start - crop < 1:  # the continuation alone is longer than the model's context
            raise ValueError(f"{task.label} item {idx}: its continuation does not fit in {max_len} tokens")
        rows.append(Row(s[crop:], start - crop, end - crop))
    return rows


@functools.lru_cache(maxsize=4)
def rendered_tasks(path, official, max_per_task, rank, world_size, max_len):
    """Per task: (task, examples, [(item, rows)] of this rank's items, idx % world_size == rank). Cached: training
    scores the same rows at every evaluation."""
    enc = common.get_encoder()
    tasks, items = read_bundle(path, official)
    out = []
    for task in tasks:
        data = task_examples(items[task.label], max_per_task)
        if len(data) <= task.shots:  # each item's few-shot examples are drawn from the others
            raise common.UserError(f"--max_per_task {max_per_task} leaves task {task.label} {len(data)} items, and its "
                                   f"{task.shots}-shot prompts need {task.shots + 1}; pass a larger one")
        mine = [(data[i], example_rows(task, data, i, enc, max_len)) for i in range(rank, len(data), world_size)]
        out.append((task, len(data), mine))
    return tuple(out)


# -----------------------------------------------------------------------------
# Scoring


def batches(examples, batch_tokens):
    """Rows to go through the model together, as lists of (example, choice): with batch_tokens, rows of similar
    length from any examples, each batch's rows x width within it; with 0, one example's rows, nanochat's way."""
    if not batch_tokens:
        return [[(e, c) for c in range(len(rows))] for e, rows in enumerate(examples)]
    keys = sorted(((e, c) for e, rows in enumerate(examples) for c in range(len(rows))),
                  key=lambda k: len(examples[k[0]][k[1]].tokens))
    out, batch = [], []
    for key in keys:  # sorted by length: the last row is the widest
        if batch and (len(batch) + 1) * len(examples[key[0]][key[1]].tokens) > batch_tokens:
            out.append(batch)
            batch = []
        batch.append(key)
    return out + [batch] if batch else out


@torch.no_grad()
def score_batch(model, rows, device, head_everywhere=False):
    """Per row: (the mean loss over its scored tokens, whether each of them is the model's argmax). The rows are
    padded on the right with EOT, which causal attention never lets an earlier position see."""
    width = max(len(r.tokens) for r in rows)
    tokens = torch.full((len(rows), width), EOT, dtype=torch.long)
    scored = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r.tokens)] = torch.tensor(r.tokens)
        scored[i, r.start - 1:r.end - 1] = True  # position t predicts token t + 1
    tokens, scored = tokens.to(device), scored.to(device)
    hidden = model.hidden(tokens)
    if head_everywhere:  # nanochat's way: the logits at every position, then the scored ones picked out
        logits = model.head(hidden)[:, :-1][scored]
    else:  # lm_head only where a scored token is predicted: the same numbers, a fraction of the work
        logits = model.head(hidden[:, :-1][scored])
    logits = logits.float()[:, :VOCAB]
    targets = tokens[:, 1:][scored]
    losses = F.cross_entropy(logits, targets, reduction="none")
    hits = (logits.argmax(dim=-1) == targets).long()
    row = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(scored)[scored]
    n = scored.sum(dim=1)
    loss_sum = torch.zeros(len(rows), device=device).index_add_(0, row, losses)
    hit_sum = torch.zeros(len(rows), dtype=torch.long, device=device).index_add_(0, row, hits)
    return list(zip((loss_sum / n).tolist(), (hit_sum == n).tolist()))


def is_correct(kind, item, scores):
    """Language modelling: every continuation token the argmax. Otherwise the row of lowest mean loss, the first
    of equals (as Python's min finds it), must be the gold one."""
    if kind == "language_modeling":
        return scores[0][1]
    means = [mean for mean, _ in scores]
    return means.index(min(means)) == item["gold"]


def score_task(task, model, device, mine, batch_tokens, autocast_ctx):
    """How many of this rank's items of one task the model gets right."""
    examples = [rows for _, rows in mine]
    scores = [[None] * len(rows) for rows in examples]
    for batch in batches(examples, batch_tokens):
        with autocast_ctx or contextlib.nullcontext():
            results = score_batch(model, [examples[e][c] for e, c in batch], device, head_everywhere=not batch_tokens)
        for (e, c), result in zip(batch, results):
            scores[e][c] = result
    return sum(int(is_correct(task.kind, item, s)) for (item, _), s in zip(mine, scores))


def evaluate(model, device, path, official, max_per_task=None, rank=0, world_size=1, batch_tokens=8192,
             autocast_ctx=None, progress=False):
    """This rank's correct counts, one per task in core.yaml's order, to be summed across ranks (sum_scores)."""
    tasks = rendered_tasks(path, official, max_per_task, rank, world_size, model.max_len)
    if progress:
        rows = [r for _, _, mine in tasks for _, item_rows in mine for r in item_rows]
        print(f"CORE: {len(tasks)} tasks, {sum(len(mine) for _, _, mine in tasks):,} items on this rank ({len(rows):,} "
              f"rows, {sum(len(r.tokens) for r in rows):,} tokens)", file=sys.stderr, flush=True)
    out = []
    for task, examples, mine in tasks:
        t0 = time.time()
        correct = score_task(task, model, device, mine, batch_tokens, autocast_ctx)
        out.append(Score(task, examples, correct))
        if progress:
            print(f"  {task.label}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
    return out


def sum_scores(scores, device, distributed):
    """Every rank's counts summed: the whole task's."""
    if not distributed:
        return scores
    counts = torch.tensor([s.correct for s in scores], dtype=torch.long, device=device)
    dist.all_reduce(counts)
    return [s._replace(correct=c) for s, c in zip(scores, counts.tolist())]


def centred(accuracy, baseline):
    """0 at random guessing (baseline in percent), 1 at every answer right."""
    return (accuracy - 0.01 * baseline) / (1.0 - 0.01 * baseline)


def core_score(scores):
    """The mean centred accuracy over the tasks: CORE."""
    return sum(centred(s.correct / s.examples, s.task.baseline) for s in scores) / len(scores)


# -----------------------------------------------------------------------------
# Reporting, and the script


def table(scores):
    """One line per task (type, shots, examples, accuracy, centred), then CORE."""
    lines = [f"{'task':<34} {'type':<17} {'shots':>5} {'examples':>8} {'accuracy':>8} {'centred':>8}"]
    for s in scores:
        accuracy = s.correct / s.examples
        lines.append(f"{s.task.label:<34} {s.task.kind:<17} {s.task.shots:>5} {s.examples:>8} {accuracy:>8.4f} "
                     f"{centred(accuracy, s.task.baseline):>8.4f}")
    lines.append(f"{'CORE':<34} {'':<17} {'':>5} {sum(s.examples for s in scores):>8} {'':>8} "
                 f"{core_score(scores):>8.4f}")
    return "\n".join(lines)


def reference_line(shape):
    """What OpenAI's GPT-2 of this (n_layer, n_embd) scored in nanochat's measurement, or None for other shapes."""
    size = hellaswag.gpt2_baselines(*shape) if shape else None
    if size is None:
        return None
    return (f"for comparison: OpenAI's GPT-2 {size['name']} CORE {size['core']:.4f} (nanochat's measurement, all "
            f"examples); GPT-2 1558M's {hellaswag.GPT2_SIZES[(48, 1600)]['core']:.6f} is the time-to-GPT-2 bar")


def write_scores(scores, out):
    """The table as .csv or .json (by out's suffix), written whole or not at all."""
    rows = [dict(task=s.task.label, type=s.task.kind, shots=s.task.shots, examples=s.examples,
                 accuracy=s.correct / s.examples, centred=centred(s.correct / s.examples, s.task.baseline))
            for s in scores]

    def write(f):
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        if out.endswith(".json"):
            json.dump(dict(tasks=rows, core=core_score(scores)), text, indent=1)
        else:
            w = csv.DictWriter(text, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
            w.writerow(dict(task="CORE", centred=core_score(scores)))
        text.flush()
        text.detach()  # f stays open for atomic_write to sync and close

    try:
        common.atomic_write(out, write)
    except OSError as e:
        raise common.UserError(f"could not write {out} ({common.write_failure(out, e)}); free some space or pick "
                               "another --out") from None


def parse_args(argv):
    p = common.ArgumentParser(description="Score a GPT-2 model on CORE, nanochat's 22 tasks (under torchrun: the "
                                          "examples split across ranks).")
    p.add_argument("-m", "--model", default="gpt2",
                   help="gpt2 / gpt2-medium / ..., a transformers directory, or a train_gpt2.py checkpoint")
    p.add_argument("-d", "--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--max_per_task", type=int, default=None,
                   help="score the first N examples of each task, after nanochat's shuffle (nanochat uses 500 "
                        "while training; all for the reported scores)")
    p.add_argument("--batch_tokens", type=int, default=8192,
                   help="tokens per forward pass, rows of many examples at once (0: one example at a time)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="default: bf16 on CUDA GPUs that compute it natively, else fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--bundle", default=None, help="score this eval_bundle.zip as it is (default: nanochat's, "
                                                  "downloaded and checked)")
    p.add_argument("--cache_dir", default=None, help="where nanochat's bundle is kept (default $CORE_CACHE_DIR or "
                                                     "./core_bundle)")
    p.add_argument("--out", default=None, help="also write the table to this .csv or .json")
    args = p.parse_args(argv)
    if args.batch_tokens < 0 or (args.max_per_task is not None and args.max_per_task <= 0):
        p.error("--batch_tokens must be >= 0 and --max_per_task positive")
    if args.out and not args.out.endswith((".csv", ".json")):
        p.error(f"--out {args.out}: name a .csv or a .json file")
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        device, autocast_ctx = runtime.scoring_device(args.device, args.dtype)
        path, official = bundle_path(args.bundle, args.cache_dir)
        read_bundle(path, official)  # the data first: quicker to find a damaged one
        model = hellaswag.load_model(args.model, device, args.compile)
        if world_size > 1:
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        t0 = time.time()
        scores = evaluate(model, device, path, official, args.max_per_task, rank, world_size, args.batch_tokens,
                          autocast_ctx, progress=rank == 0)
        scores = sum_scores(scores, device, world_size > 1)
        if world_size > 1:
            dist.barrier()
            dist.destroy_process_group()
        if rank == 0 and args.out:
            write_scores(scores, args.out)
    except common.UserError as e:
        sys.exit(f"core.py: error: {e}")
    if rank == 0:
        print(table(scores))
        print(f"{args.model}: CORE {core_score(scores):.4f} | {time.time() - t0:.1f} s"
              + ("" if args.max_per_task is None else f" | at most {args.max_per_task} examples per task"))
        if line := reference_line(model.shape):
            print(line)
        if not official:
            print(f"note: {path} is not nanochat's bundle as downloaded: scores compare only with scores on it")


if __name__ == "__main__":
    # train_gpt2 (which a .pt model needs) imports this file by name: let it find this copy, not load a second
    sys.modules.setdefault("core", sys.modules[__name__])
    common.run_main(main)
