"""
FineWeb-Edu (sample-10BT) -> GPT-2 token shards for train_gpt2.py.

    python fineweb.py                                    # ~10B tokens into ./edu_fineweb10B (about 20 GB)
    python fineweb.py --dataset my_corpus.jsonl --out_dir my_shards --shard_size 10000000

Every document is prefixed with <|endoftext|> and tokenized with tiktoken's GPT-2 BPE; the
token stream is cut into shards of --shard_size uint16 tokens, saved with np.save as
{prefix}_{split}_{index:06d}.npy. Shard 0 is the val split, the rest train. A document that
does not fit in the current shard continues in the next one. Given the same documents in
the same order, the files are byte-identical to build-nanogpt's fineweb.py.
"""

import argparse
import glob
import multiprocessing as mp
import os
import sys

import numpy as np
from tqdm import tqdm

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSION = (".xz", ".gz", ".bz2", ".zst")

_enc = None  # each worker's tokenizer, made by init_worker


class DataError(Exception):
    """Bad input or no network; printed as one line."""


def init_worker():
    global _enc
    import tiktoken

    _enc = tiktoken.get_encoding("gpt2")


def tokenize(text):
    """One document -> uint16 tokens, starting with the <|endoftext|> delimiter."""
    tokens = np.array([_enc.eot_token] + _enc.encode_ordinary(text))
    assert (0 <= tokens).all() and (tokens < 2 ** 16).all(), "token ids must fit in uint16"
    return tokens.astype(np.uint16)


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
        raise DataError(f"{path}: expected .jsonl, .json, .parquet or .txt files of one kind, found {found}")
    return kinds.popitem()


def load_documents(args):
    """An iterable of document texts, in the dataset's order."""
    import datasets

    datasets.logging.set_verbosity_error()
    if os.path.exists(args.dataset):
        builder, files = local_files(args.dataset)
        # .txt: one document per file, as the `text` builder reads it with sample_by="document"
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        what = f"{args.dataset} ({len(files)} {builder} file{'s' if len(files) > 1 else ''})"
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        except Exception as e:
            raise DataError(f"could not read {what}: {first_line(e)}") from None
    else:
        if args.dataset.startswith((".", "/", "~")) or any(e in args.dataset for e in LOCAL_BUILDERS):
            raise DataError(f"local dataset {args.dataset} does not exist")
        what = f"{args.dataset} ({args.remote_name})"
        try:
            ds = datasets.load_dataset(args.dataset, name=args.remote_name, split="train")
        except Exception as e:
            raise DataError(f"could not load {what} from the Hugging Face hub: {first_line(e)}. Check the name "
                            "and the network, or pass a local .jsonl/.parquet/.txt path with --dataset") from None
    if args.text_column not in ds.column_names:
        raise DataError(f"{what} has no {args.text_column!r} column (columns: {', '.join(ds.column_names)}); "
                        "pass --text_column")
    print(f"{what}: {len(ds):,} documents")
    return (doc[args.text_column] for doc in ds)


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_shard(path, tokens):
    """np.save through a temporary file and a rename: a shard on disk is always complete."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.save(f, tokens)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shards(token_arrays, out_dir, prefix, shard_size):
    """Pack the token arrays into shards in order; returns the paths written."""
    paths = []
    buf = np.empty((shard_size,), dtype=np.uint16)
    count = 0
    bar = None

    def flush(n):
        split = "val" if not paths else "train"
        path = os.path.join(out_dir, f"{prefix}_{split}_{len(paths):06d}.npy")
        write_shard(path, buf[:n])
        paths.append(path)

    for tokens in token_arrays:
        if bar is None:
            bar = tqdm(total=shard_size, unit="tokens", desc=f"Shard {len(paths)}")
        # a document that fills the shard (exactly, or past its end) closes it; the rest starts the next
        while count + len(tokens) >= shard_size:
            remainder = shard_size - count
            buf[count:] = tokens[:remainder]
            bar.update(remainder)
            bar.close()
            flush(shard_size)
            tokens = tokens[remainder:]
            count = 0
            bar = tqdm(total=shard_size, unit="tokens", desc=f"Shard {len(paths)}")
        buf[count:count + len(tokens)] = tokens
        count += len(tokens)
        bar.update(len(tokens))
    if bar is not None:
        bar.close()
    if count:
        flush(count)
    return paths


def prepare_out_dir(out_dir, prefix, overwrite):
    """Existing shards are never replaced unless asked to."""
    os.makedirs(out_dir, exist_ok=True)
    existing = sorted(glob.glob(os.path.join(out_dir, f"{prefix}_*.npy")))
    if existing and not overwrite:
        raise DataError(f"{out_dir} already holds {len(existing)} {prefix}_*.npy shards; pass --out_dir NEW_DIR, "
                        "or --overwrite to delete them and write new ones")
    for f in existing:
        os.remove(f)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Tokenize a text dataset into GPT-2 uint16 shards.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu",
                   help="a hub dataset id, or a local .jsonl/.json/.parquet file, a folder of them, "
                        "or a folder of .txt files (one document per file); .xz/.gz/.bz2/.zst are read too")
    p.add_argument("--remote_name", default="sample-10BT", help="the hub dataset's config name")
    p.add_argument("--text_column", default="text")
    p.add_argument("--out_dir", default="edu_fineweb10B")
    p.add_argument("--prefix", default="edufineweb", help="shard file names start with this")
    p.add_argument("--shard_size", type=int, default=10 ** 8, help="tokens per shard")
    p.add_argument("--num_proc", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="delete the shards already in --out_dir first")
    args = p.parse_args(argv)
    if args.shard_size <= 0 or args.num_proc <= 0:
        p.error("--shard_size and --num_proc must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        init_worker()  # fail here, once, if the tokenizer cannot be loaded
    except Exception as e:
        sys.exit(f"fineweb.py: error: could not load the GPT-2 tokenizer ({type(e).__name__}); connect once "
                 "to cache it, or set TIKTOKEN_CACHE_DIR to a folder holding its files")
    try:
        texts = load_documents(args)
        prepare_out_dir(args.out_dir, args.prefix, args.overwrite)
        # imap keeps the documents' order; chunks of 16 amortise the inter-process traffic
        with mp.Pool(args.num_proc, initializer=init_worker) as pool:
            paths = write_shards(pool.imap(tokenize, texts, chunksize=16), args.out_dir, args.prefix,
                                 args.shard_size)
    except DataError as e:
        sys.exit(f"fineweb.py: error: {e}")
    if not paths:
        sys.exit(f"fineweb.py: error: {args.dataset} holds no documents")
    print(f"wrote {len(paths)} shards to {args.out_dir} (1 val, {len(paths) - 1} train)")
    if len(paths) == 1:
        print("warning: only the val shard was written; train_gpt2.py needs train shards too: "
              "use a smaller --shard_size")


if __name__ == "__main__":
    main()
