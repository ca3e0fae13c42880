"""
Helpers every script here shares: the one-line error and the flags' parser, safe writes, downloads,
folder locks, GPT-2's tokenizer. It needs no torch (fineweb.py's tokenizer processes load it), so what
needs torch (devices, ranks) is in runtime.py.

Nothing in this file is part of the GPT-2 recipe; train_gpt2.py can be read without opening it.
"""

import argparse
import fcntl
import functools
import hashlib
import math
import os
import shutil
import socket
import sys
import threading
import time
import zlib

import numpy as np
import requests
import tiktoken
from tqdm import tqdm

BIN_MAGIC, BIN_VERSION = 20240520, 1  # llm.c's data file header (fineweb.py writes it, train_gpt2.py reads it)


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, no network); printed as one line, no traceback."""

    exit_code = 1


class RunDiverged(UserError):
    """The run's loss or gradient went non-finite. Its own exit code, so that a restart loop can stop: the same
    command would only diverge again (and torchrun --max-restarts finds the run refusing at once)."""

    exit_code = 3


class AnotherRankFailed(UserError):
    """This rank stops because another one failed (or torchrun, seeing it, stops every rank): nothing to tell the
    others, and no time to lose before saying so."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default shown once: not added where the default is None (the help says it)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose flag errors are one line that points at --help, not the whole usage first."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def given(self, argv=None):
        """The flags (their dests) that the command line names, as against those left at a default or preset:
        argparse fills in a default only where the namespace it parses into has no value yet."""
        unset = object()
        namespace = argparse.Namespace(**{a.dest: unset for a in self._actions if a.dest != "help"})
        self.parse_known_args(argv, namespace=namespace)
        return {dest for dest, value in vars(namespace).items() if value is not unset}


def first_line(e):
    """The first line of an exception's message, for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def file_fingerprint(path, blocks=16, block_size=4096):
    """[size, CRC-32 of `blocks` blocks spread over the file]: cheap (64 KiB read), and it changes when a shard
    is replaced by other tokens, even under the same name and size."""
    size = os.path.getsize(path)
    crc = 0
    with open(path, "rb") as f:
        for i in range(blocks):
            f.seek(max(0, (size - block_size) * i // max(1, blocks - 1)))
            crc = zlib.crc32(f.read(block_size), crc)
    return [size, crc]


def finite_float(text):
    """argparse type: a float that is neither NaN nor infinite (float() accepts "nan" and "inf")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def bin_shard_problem(path):
    """What is wrong with an llm.c GPT-2 token file (256 int32 of header: magic, version, token count; then the
    uint16 tokens), in words, or None: the magic number, the version, and a size that is what the header promises."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    if len(header) < 256 or header[0] != BIN_MAGIC:
        return f"is not an llm.c data file (no magic number {BIN_MAGIC})"
    if header[1] != BIN_VERSION:
        return f"is llm.c data version {header[1]}, only {BIN_VERSION} (uint16) is read"
    size, expected = os.path.getsize(path), 256 * 4 + 2 * int(header[2])
    if size != expected:
        return f"has {size:,} bytes, its header promises {expected:,}: truncated?"
    return None


def write_failure(path, e):
    """Why writing `path` failed, in words: the OS's reason, or for errors that do not carry one (torch's zip
    writer, safetensors) their first line and the space left on that disk."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        free = f"{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    return f"{first_line(e)}; {free}"


def atomic_write(path, write):
    """write(f) into path's temporary name (binary), fsync, rename: `path` is the old file or the new one, never
    half. On any failure the temporary file is removed and the error raised again, for the caller to word."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


@functools.lru_cache(maxsize=None)
def file_sha256(path, mtime=None):
    """The sha256 of a file's bytes, as hex. Cached: pass the file's mtime for a copy replaced since to be read
    again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url, path, chunk_size=1 << 20):
    """Stream `url` into a temporary file next to `path`, then rename: `path` is complete or absent."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with requests.get(url, stream=True, timeout=30) as resp:
            resp.raise_for_status()
            total = int(resp.headers.get("content-length", 0)) or None
            bar = tqdm(total=total, unit="iB", unit_scale=True, desc=os.path.basename(path))
            with open(tmp, "wb") as f, bar:
                for chunk in resp.iter_content(chunk_size=chunk_size):
                    bar.update(f.write(chunk))
        os.replace(tmp, path)
    except requests.RequestException as e:
        raise UserError(f"could not download {url} ({type(e).__name__}); fetch it yourself and place it "
                        f"at {path}") from None
    except OSError as e:
        raise UserError(f"could not write {path} ({write_failure(path, e)}); free some space or pick another "
                        "folder, then rerun") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=None)
def import_wandb():
    """The wandb module for --wandb, or a one-line error naming the install command."""
    try:
        import wandb  # an optional dependency: imported only for --wandb
    except ImportError:
        raise UserError("--wandb needs Weights & Biases, which is not installed: pip install wandb "
                        "(or leave out --wandb)") from None
    return wandb


def get_encoder():
    """GPT-2's BPE through tiktoken, loaded on first use (it may need the network once)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises plain requests/OS errors when its files cannot be fetched
        raise UserError(f"could not load the GPT-2 tokenizer with tiktoken ({type(e).__name__}); connect once to "
                        "cache it (vocab.bpe and encoder.json from "
                        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/), or set TIKTOKEN_CACHE_DIR "
                        "to a folder holding tiktoken's cache of them") from None


def unusable_folder(flag, folder, e):
    """The one-line error for a folder that cannot be written (read-only, no permission, a file in the way)."""
    return UserError(f"cannot use {flag} {folder} ({e.strerror or e}); pass a folder you can write to")


def lock_folder(folder, name, flag):
    """
    Make `folder` (given as `flag`) and hold folder/name with an exclusive fcntl.flock for the rest of this
    process's life: the kernel frees it however the process ends, kill -9 included, so a stale lock never
    blocks a rerun. If another process holds it, a UserError naming that process. Returns the lock's file
    descriptor (keep it open).
    """
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, name), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise unusable_folder(flag, folder, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UserError(f"{folder} is in use by {holder} (it holds {name}); wait for it to end or stop it, "
                        f"or pass another {flag}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def exit_with_parent(what):
    """End this process soon after its parent dies (checked every 0.2 s). torchrun starts each rank in a session
    of its own, so a kill -9 of torchrun would otherwise leave them running, holding their folder's lock."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        print(f"{what}: its parent process (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit_with_parent").start()


def print_line(line):
    """`line` and its newline to stderr in one write. Ranks share torchrun's stderr, and with PYTHONUNBUFFERED two
    writes each (print's, or Python's own for `sys.exit("...")`) splice their lines into one; one write of under
    4 KiB to a pipe is never split."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


_skip_teardown = False  # set by skip_teardown_at_exit: run_main ends the process without Python's teardown


def skip_teardown_at_exit():
    """Once main() returns, end the process at once (its output flushed) instead of tearing the interpreter
    down. For objects torch keeps beyond our reach whose C++ destructors abort when run during that teardown:
    under FSDP, DTensor's caches keep the device mesh, and with it gloo's process group and worker threads, alive
    after destroy_process_group; freeing them as the interpreter ends aborted a finished rank now and then
    ("terminate called without an active exception", exit -6), and torchrun called the run failed."""
    global _skip_teardown
    _skip_teardown = True


def run_main(main):
    """main() as a process, its exit message written in one write (print_line)."""
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):
            print_line(code)
            code = 1
    if _skip_teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    raise SystemExit(code)
