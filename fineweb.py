"""
FineWeb-Edu (sample-10BT) -> GPT-2 token shards for train_gpt2.py.

    python fineweb.py                                    # ~10B tokens into ./edu_fineweb10B (about 20 GB)
    python fineweb.py --dataset fineweb --remote_name sample-100BT --streaming --out_dir fineweb100B
    python fineweb.py --dataset shakespeare              # Tiny Shakespeare, for a first run on a laptop
    python fineweb.py --dataset my_corpus.jsonl --out_dir my_shards --shard_size 10000000
    python fineweb.py --pretokenized fineweb-edu-10B --num_shards 10   # download others' shards instead

Every document is prefixed with <|endoftext|> and tokenized with tiktoken's GPT-2 BPE; the
token stream is cut into shards of --shard_size uint16 tokens, {prefix}_{split}_{index:06d}.npy
(or llm.c's .bin). Shard 0 is the val split, the rest train. A document that does not fit in the
current shard continues in the next one. Given the same documents in the same order, the .npy files
are byte-identical to build-nanogpt's fineweb.py. An interrupted run, rerun with the same flags,
continues after its last finished shard and writes exactly what an uninterrupted run writes.
"""

import collections
import contextlib
import glob
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import datasets
import numpy as np
from tqdm import tqdm

from machinery import common, pretokenized
from machinery.common import UserError

HUB_DATASETS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
HUB_SAMPLES = ("sample-10BT", "sample-100BT", "sample-350BT")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSION = (".xz", ".gz", ".bz2", ".zst")
LOCK_NAME = "fineweb.lock"  # held by the run writing the folder

_enc = None  # each worker's tokenizer, made by init_worker
_lock_fd = None  # the out_dir lock's descriptor in the main process, which forked workers must not keep


# -----------------------------------------------------------------------------
# Tokenization: large batches of documents per task, so the work, not the messaging, dominates


def init_worker():
    """This process's tokenizer; a UserError when tiktoken cannot load it (offline, no cache)."""
    global _enc
    _enc = common.get_encoder()


def init_pool_worker():
    """A tokenizer process: drop the copy of the folder's lock that fork gave it (so the lock dies with the main
    process), and exit if the main process is killed, rather than linger."""
    if _lock_fd is not None:
        os.close(_lock_fd)
    common.exit_with_parent("fineweb.py tokenizer process")
    init_worker()


def tokenize_batch(texts):
    """Documents -> (their tokens concatenated, each one led by <|endoftext|>, as uint16; each one's length)."""
    docs = [_enc.encode_ordinary(text) for text in texts]
    lengths = np.array([len(d) + 1 for d in docs], dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    for start, doc in zip(starts, docs):
        tokens[start] = _enc.eot_token
        tokens[start + 1:start + len(doc) + 1] = doc  # GPT-2's ids are all below 2**16
    return tokens, lengths


def batches(texts, chunk_chars):
    """Group documents into lists of about chunk_chars characters, in order."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenized(texts, args):
    """(tokens, lengths) of each batch of documents, in order, from args.num_proc tokenizer processes, a few
    batches ahead. A process that dies (the OOM killer) stops the run with one line instead of a hang."""
    pending = collections.deque()
    with ProcessPoolExecutor(args.num_proc, initializer=init_pool_worker) as pool:
        try:
            for batch in batches(texts, args.chunk_chars):
                pending.append(pool.submit(tokenize_batch, batch))
                if len(pending) > 2 * args.num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            raise UserError("a tokenizer process died (killed for lack of memory?); rerun with fewer --num_proc or "
                            "a smaller --chunk_chars: it continues after the last finished shard") from None


# -----------------------------------------------------------------------------
# Shards


def shard_path(out_dir, prefix, index, fmt):
    return os.path.join(out_dir, f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.{fmt}")


def write_shard(path, tokens):
    """np.save (.npy) or llm.c's header + uint16 (.bin), through a temporary file and a rename."""
    def write(f):
        if path.endswith(".bin"):
            header = np.zeros(256, dtype=np.int32)
            header[:3] = (common.BIN_MAGIC, common.BIN_VERSION, len(tokens))
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16).tobytes())
        else:
            np.save(f, tokens)

    save_atomically(path, write)


def save_atomically(path, write):
    """common.atomic_write, with a failure (a full disk) worded for this script."""
    try:
        common.atomic_write(path, write)
    except OSError as e:
        raise UserError(f"could not write {path} ({e.strerror or e}); free some space, then rerun the same "
                        "command: it continues after the last finished shard") from None


class ShardWriter:
    """
    Packs the token stream into shards. After each shard it records where the stream stands, as
    (documents finished, tokens of the next document already written), so a rerun can start there.
    """

    def __init__(self, out_dir, prefix, shard_size, fmt, next_shard, doc, on_shard):
        self.out_dir, self.prefix, self.shard_size, self.fmt = out_dir, prefix, shard_size, fmt
        self.buf = np.empty((shard_size,), dtype=np.uint16)
        self.count = 0  # tokens in buf
        self.next_shard = next_shard
        self.doc = doc  # index of the first document of the next batch
        self.on_shard = on_shard
        self.tokens_written = 0
        self.bar = None

    def add(self, tokens, lengths, skip=0):
        """Append a batch's tokens (documents of these lengths), leaving out its first `skip` tokens."""
        ends = np.cumsum(lengths)
        used = skip  # tokens of this batch placed (or skipped) so far
        # a batch that fills the shard (exactly, or past its end) closes it; the rest starts the next
        while self.count + len(tokens) - used >= self.shard_size:
            take = self.shard_size - self.count
            self.place(tokens[used:used + take])
            used += take
            finished = int(np.searchsorted(ends, used, side="right"))  # documents wholly before the cut
            self.flush(doc=self.doc + finished, offset=used - (int(ends[finished - 1]) if finished else 0))
        self.place(tokens[used:])
        self.doc += len(lengths)

    def place(self, tokens):
        if self.bar is None:
            self.bar = tqdm(total=self.shard_size, unit="tokens", desc=f"Shard {self.next_shard}")
        self.buf[self.count:self.count + len(tokens)] = tokens
        self.count += len(tokens)
        self.bar.update(len(tokens))

    def flush(self, doc, offset):
        write_shard(shard_path(self.out_dir, self.prefix, self.next_shard, self.fmt), self.buf[:self.count])
        self.tokens_written += self.count
        self.next_shard += 1
        self.count = 0
        self.on_shard(self.next_shard, doc, offset)
        self.bar.close()
        self.bar = None

    def close(self):
        if self.count:
            self.flush(doc=self.doc, offset=0)
        elif self.bar is not None:
            self.bar.close()


# -----------------------------------------------------------------------------
# Datasets


def local_files(path):
    """The files of a local dataset and the `datasets` builder that reads them."""
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(f))
    else:
        files = [path]
    kinds = {}
    for f in files:
        stem = f[:-len(ext)] if (ext := next((c for c in COMPRESSION if f.endswith(c)), "")) else f
        builder = LOCAL_BUILDERS.get(os.path.splitext(stem)[1])
        if builder:
            kinds.setdefault(builder, []).append(f)
    if len(kinds) != 1:
        found = "none" if not kinds else " and ".join(kinds)
        raise UserError(f"{path}: expected .jsonl, .json, .parquet or .txt files of one kind, found {found}")
    return kinds.popitem()


def fetch_shakespeare(out_dir):
    """Tiny Shakespeare (1.1 MB, one document), downloaded once into out_dir/input.txt."""
    path = os.path.join(out_dir, "input.txt")
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        common.download_file(SHAKESPEARE_URL, path)
    return path


def load_documents(args, skip):
    """The dataset (after its first `skip` documents) as an iterator of texts, and a short description."""
    datasets.logging.set_verbosity_error()
    source = fetch_shakespeare(args.out_dir) if args.dataset == "shakespeare" else args.dataset
    if os.path.exists(source):
        builder, files = local_files(source)
        # .txt: one document per file, as the `text` builder reads it with sample_by="document"
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        what = f"{source} ({len(files)} {builder} file{'s' if len(files) > 1 else ''})"
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=args.streaming, **kwargs)
        except StopIteration:  # streaming peeks at the first row for the columns
            raise UserError(f"{what} holds no documents") from None
        except Exception as e:
            raise UserError(f"could not read {what}: {common.first_line(e)}") from None
    else:
        if source.startswith((".", "/", "~")) or any(e in source for e in LOCAL_BUILDERS):
            raise UserError(f"local dataset {source} does not exist")
        name = HUB_DATASETS.get(source, source)
        what = f"{name} ({args.remote_name}{', streaming' if args.streaming else ''})"
        try:
            ds = datasets.load_dataset(name, name=args.remote_name, split="train", streaming=args.streaming)
        except Exception as e:
            raise UserError(f"could not load {what} from the Hugging Face hub: {common.first_line(e)}. Check the name "
                            "and the network, or pass a local .jsonl/.parquet/.txt path with --dataset") from None
    try:
        columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)))
    except StopIteration:
        raise UserError(f"{what} holds no documents") from None
    except Exception as e:  # the first row already unreadable (bad bytes)
        raise UserError(f"could not read {what}: {common.first_line(e)}") from None
    if args.text_column not in columns:
        raise UserError(f"{what} has no {args.text_column!r} column (columns: {', '.join(columns)}); "
                        "pass --text_column")
    if skip:
        ds = ds.skip(skip)
    print(f"{what}: {'streaming' if args.streaming else f'{len(ds) + skip:,} documents'}")
    return checked_texts(ds, args.text_column, what, skip), what


def checked_texts(ds, column, what, skip):
    """The texts of `column`, in order; a row that cannot be read (bad bytes) or has no text stops the run
    with one line naming the row."""
    rows, row = ds.iter(batch_size=1024), skip
    while True:
        try:
            batch = next(rows)
        except StopIteration:
            return
        except Exception as e:  # the readers raise their own decoding errors
            raise UserError(f"could not read {what} after row {row:,}: {common.first_line(e)}") from None
        for text in batch[column]:
            if not isinstance(text, str):
                raise UserError(f"{what}: row {row:,} has no text ({column} is {text!r:.40}); fix or drop that row")
            yield text
            row += 1


# -----------------------------------------------------------------------------
# Restarting: where the last finished shard left the document stream


def progress_path(args):
    return os.path.join(args.out_dir, f"{args.prefix}_progress.json")


def fingerprint(args):
    """What must not change between a run and its continuation."""
    return {k: getattr(args, k) for k in ("dataset", "remote_name", "text_column", "shard_size", "prefix", "format")}


def save_progress(args, **state):
    """Where the stream stands after the last finished shard, and each finished shard's fingerprint."""
    data = json.dumps({"fingerprint": fingerprint(args), **state}, indent=2).encode()
    save_atomically(progress_path(args), lambda f: f.write(data))


def load_progress(args):
    try:
        with open(progress_path(args)) as f:
            state = json.load(f)
        state["fingerprint"], state["next_shard"], state["doc"], state["offset"]  # noqa: B018 (all must be there)
        return state
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{progress_path(args)} is damaged ({type(e).__name__}); pass --overwrite to write the "
                        "shards again") from None


def check_recorded_shards(args, state):
    """Every shard the progress file records is there, as it was written; later ones are made again."""
    for name, recorded in state.get("shards", {}).items():  # none recorded: a progress file of an older version
        path = os.path.join(args.out_dir, name)
        if int(name.rsplit("_", 1)[1].split(".")[0]) >= state["next_shard"]:
            continue
        if not os.path.exists(path) or common.file_fingerprint(path) != recorded:
            what = "changed" if os.path.exists(path) else "gone"
            raise UserError(f"shard {path}, which this script wrote, is {what}; pass --overwrite to write the shards "
                            "again")


def prepare_out_dir(args):
    """Where to start: {"next_shard", "doc", "offset"}, or None when the run has already finished."""
    existing = sorted(glob.glob(os.path.join(args.out_dir, f"{args.prefix}_*_*.npy")) +
                      glob.glob(os.path.join(args.out_dir, f"{args.prefix}_*_*.bin")))
    if os.path.exists(os.path.join(args.out_dir, pretokenized.PROGRESS_NAME)):
        raise UserError(f"{args.out_dir} holds downloaded shards (fineweb.py --pretokenized); they are never mixed "
                        "with tokenized ones: pass --out_dir NEW_DIR")
    state = None
    if os.path.exists(progress_path(args)) and not args.overwrite:
        state = load_progress(args)
        if state["fingerprint"] != fingerprint(args):
            changed = [k for k, v in fingerprint(args).items() if state["fingerprint"].get(k) != v]
            raise UserError(f"{args.out_dir} holds a run made with other --{', --'.join(changed)}; rerun with "
                            "its flags to continue it, or pass --out_dir NEW_DIR, or --overwrite")
        check_recorded_shards(args, state)
        if state.get("done"):
            return None
        # shards past the recorded point were written after the progress file: they are made again
        return state
    if existing and not args.overwrite:
        raise UserError(f"{args.out_dir} already holds {len(existing)} {args.prefix} shards that this script did "
                        "not record; pass --out_dir NEW_DIR, or --overwrite to delete them and write new ones")
    for f in existing + glob.glob(progress_path(args)):
        os.remove(f)
    return {"next_shard": 0, "doc": 0, "offset": 0, "shards": {}}


@contextlib.contextmanager
def claim_out_dir(args):
    """Make --out_dir and hold its lock while writing, so a second fineweb.py there stops with one line. If the
    run fails before writing anything into a folder it made, the folder goes again."""
    global _lock_fd
    made = not os.path.isdir(args.out_dir)
    fd = _lock_fd = common.lock_folder(args.out_dir, LOCK_NAME, "--out_dir")
    try:
        yield
    except BaseException:
        left = set(os.listdir(args.out_dir)) - {LOCK_NAME, os.path.basename(progress_path(args))}
        if made and not left:
            for name in os.listdir(args.out_dir):
                os.remove(os.path.join(args.out_dir, name))
            os.rmdir(args.out_dir)
        raise
    finally:
        os.close(fd)
        _lock_fd = None


# -----------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = common.ArgumentParser(description="Tokenize a text dataset into GPT-2 uint16 shards.")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu",
                   help="fineweb-edu, fineweb, shakespeare, any hub dataset id, or a local .jsonl/.json/.parquet "
                        "file, a folder of them, or a folder of .txt files (one document per file); "
                        ".xz/.gz/.bz2/.zst are read too")
    p.add_argument("--remote_name", default="sample-10BT",
                   help=f"the hub dataset's config; for FineWeb(-Edu): {', '.join(HUB_SAMPLES)}")
    p.add_argument("--streaming", action="store_true", help="read the hub dataset as it downloads, not after")
    p.add_argument("--text_column", default="text", help="the column of a table dataset that holds the documents")
    p.add_argument("--out_dir", default=None, help="default: edu_fineweb10B (tinyshakespeare for shakespeare)")
    p.add_argument("--prefix", default=None,
                   help="shard file names start with this (default: edufineweb, build-nanogpt's; tinyshakespeare "
                        "for shakespeare)")
    p.add_argument("--format", choices=["npy", "bin"], default="npy",
                   help="npy (build-nanogpt) or bin (llm.c: 256 int32 header, then uint16 tokens)")
    p.add_argument("--shard_size", type=int, default=None, help="tokens per shard (default 10**8; 50,000 "
                                                                 "for shakespeare)")
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--chunk_chars", type=int, default=2_000_000, help="characters of text per tokenizer task")
    p.add_argument("--overwrite", action="store_true", help="delete the shards already in --out_dir first")
    g = p.add_argument_group("download shards tokenized by others instead (llm.c's .bin, from the hub)")
    g.add_argument("--pretokenized", default=None, metavar="NAME",
                   help=f"{', '.join(pretokenized.SOURCES)}, or a hub dataset id holding *_val_*.bin and "
                        "*_train_*.bin; --out_dir defaults to NAME")
    g.add_argument("--num_shards", type=int, default=None,
                   help="the val shard and the first N train shards (default: all); a larger N later fetches the rest")
    g.add_argument("--jobs", type=int, default=8, help="files downloaded at once")
    args = p.parse_args(argv)
    if args.pretokenized is not None:
        if args.overwrite:
            p.error("--overwrite is for tokenizing; a download refetches only what is missing or damaged")
        if (args.num_shards is not None and args.num_shards <= 0) or args.jobs <= 0:
            p.error("--num_shards and --jobs must be positive")
        args.out_dir = args.out_dir or pretokenized.default_out_dir(args.pretokenized)
        return args
    shakespeare = args.dataset == "shakespeare"
    args.out_dir = args.out_dir or ("tinyshakespeare" if shakespeare else "edu_fineweb10B")
    # a Tiny Shakespeare folder written before its shards had their own name keeps its edufineweb_* name
    older = os.path.exists(os.path.join(args.out_dir, "edufineweb_progress.json"))
    args.prefix = args.prefix or ("tinyshakespeare" if shakespeare and not older else "edufineweb")
    if args.shard_size is None:
        args.shard_size = 50_000 if shakespeare else 10 ** 8
    if args.dataset in HUB_DATASETS and args.remote_name not in HUB_SAMPLES:
        p.error(f"--remote_name for {args.dataset} is one of {', '.join(HUB_SAMPLES)}")
    if args.shard_size <= 0 or args.num_proc <= 0 or args.chunk_chars <= 0:
        p.error("--shard_size, --num_proc and --chunk_chars must be positive")
    if args.shard_size >= 2 ** 31:
        p.error(f"--shard_size {args.shard_size} is too large: a shard holds fewer than 2**31 tokens (llm.c's header)")
    return args


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    if args.pretokenized is not None:
        return main_download(args, t0)
    missing = []  # what the run must download first, all of it named in one message when offline
    try:
        init_worker()  # here, once, before any work: the tokenizer processes load it again
    except UserError as e:
        missing.append(str(e))
    if args.dataset == "shakespeare":
        try:
            with claim_out_dir(args):
                fetch_shakespeare(args.out_dir)
        except UserError as e:
            missing.append(str(e))
    if missing:
        sys.exit(f"fineweb.py: error: {'; and '.join(missing)}")
    try:
        with claim_out_dir(args):
            writer, what, seconds = write_shards(args)
    except UserError as e:
        sys.exit(f"fineweb.py: error: {e}")
    if writer is None:
        print(f"{args.out_dir} is complete already (see {progress_path(args)}); nothing to do")
        return
    print(f"wrote {writer.next_shard} shards to {args.out_dir} (1 val, {writer.next_shard - 1} train): "
          f"{writer.doc:,} documents, {writer.tokens_written:,} tokens this run, "
          f"{writer.tokens_written / seconds / 1e6:.2f}M tokens/s tokenizing and writing, "
          f"{time.time() - t0:.1f} s in all")
    if writer.next_shard == 1:
        print("warning: only the val shard was written; train_gpt2.py needs train shards too: "
              "use a smaller --shard_size")


def main_download(args, t0):
    """`--pretokenized`: fetch the shards instead of tokenizing, into a folder locked as tokenizing locks it."""
    try:
        with claim_out_dir(args):
            have, fetched, size = pretokenized.download(args)
    except UserError as e:
        sys.exit(f"fineweb.py: error: {e}")
    if not fetched:
        print(f"{args.out_dir} holds all {have} shards asked for, intact; nothing to fetch")
        return
    print(f"fetched {fetched} shards ({size / 1e9:.2f} GB) into {args.out_dir} in {time.time() - t0:.1f} s: "
          f"{have} shards there (1 val, {have - 1} train)")


def write_shards(args):
    """Tokenize the dataset into shards, from where the last run stopped. Returns (the ShardWriter, the
    dataset's description, seconds spent), or (None, None, None) when the folder is complete already."""
    state = prepare_out_dir(args)
    if state is None:
        return None, None, None
    texts, what = load_documents(args, skip=state["doc"])
    state.setdefault("shards", {})
    save_progress(args, **state)  # before the first shard: every shard here is recorded as this script's
    if state["next_shard"]:
        print(f"continuing after shard {state['next_shard'] - 1}: document {state['doc']:,}, "
              f"token {state['offset']:,} of it")

    def on_shard(next_shard, doc, offset):
        path = shard_path(args.out_dir, args.prefix, next_shard - 1, args.format)
        state["shards"][os.path.basename(path)] = common.file_fingerprint(path)
        state.update(next_shard=next_shard, doc=doc, offset=offset)
        save_progress(args, **state)

    writer = ShardWriter(args.out_dir, args.prefix, args.shard_size, args.format, state["next_shard"],
                         state["doc"], on_shard)
    t1, skip = time.time(), state["offset"]
    for i, (tokens, lengths) in enumerate(tokenized(texts, args)):
        # the first document's first tokens may be in the last run's shards already
        writer.add(tokens, lengths, skip=skip if i == 0 else 0)
    writer.close()
    if writer.next_shard == 0:
        raise UserError(f"{what} holds no documents")
    seconds = time.time() - t1
    save_progress(args, **dict(state, done=True, documents=writer.doc, tokens=writer.tokens_written,
                               shards_written=writer.next_shard,
                               tokens_per_second=round(writer.tokens_written / seconds)))
    return writer, what, seconds


if __name__ == "__main__":
    main()
