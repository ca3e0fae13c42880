"""
Helpers every script here shares: the one-line error, downloads, GPT-2's tokenizer, and device detection.

Nothing in this file is part of the GPT-2 recipe; train_gpt2.py can be read without opening it. It
imports torch, requests and tiktoken only where a function needs them, so that fineweb.py's tokenizer
processes stay light.
"""

import argparse
import functools
import math
import os
import zlib


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, no network); printed as one line, no traceback."""


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


def write_failure(path, e):
    """Why writing `path` failed, in words: the OS's reason, or for errors that do not carry one (torch's zip
    writer, safetensors) their first line and the space left on that disk."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    import shutil

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


def download_file(url, path, chunk_size=1 << 20):
    """Stream `url` into a temporary file next to `path`, then rename: `path` is complete or absent."""
    import requests
    from tqdm import tqdm

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
        import wandb
    except ImportError:
        raise UserError("--wandb needs Weights & Biases, which is not installed: pip install wandb "
                        "(or leave out --wandb)") from None
    return wandb


def get_encoder():
    """GPT-2's BPE through tiktoken, loaded on first use (it may need the network once)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises plain requests/OS errors when its files cannot be fetched
        raise UserError(f"could not load the GPT-2 tokenizer with tiktoken ({type(e).__name__}); connect "
                        "once to cache it, or set TIKTOKEN_CACHE_DIR to a folder holding its files") from None


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
    import fcntl
    import socket

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
    import sys
    import threading
    import time

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        print(f"{what}: its parent process (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit_with_parent").start()


RANK_ERROR_KEY = "train_gpt2.py/error"
_told_others = False


def _rendezvous_store():
    """A client of torchrun's key-value store (MASTER_ADDR:MASTER_PORT), of this process's own."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=10))


def tell_other_ranks(message):
    """A rank that fails alone once training has begun leaves its message in the store, where the other
    ranks (blocked in a collective that will never complete) find it; see exit_when_another_rank_fails."""
    global _told_others
    _told_others = True
    try:
        _rendezvous_store().set(RANK_ERROR_KEY, message)
    except Exception:  # best effort: torchrun still ends the other ranks, only later
        pass


def exit_when_another_rank_fails(what):
    """Watch the store twice a second; when another rank has failed, print its message and exit. The watch
    ends, and its store client is closed in its own thread, before the interpreter shuts down: a client still
    inside a call at exit can abort the process ("terminate called without an active exception")."""
    import atexit
    import sys
    import threading

    stop = threading.Event()

    def watch():
        try:
            store = _rendezvous_store()
            while not store.check([RANK_ERROR_KEY]) or _told_others:
                if stop.wait(0.5):
                    return
            message = store.get(RANK_ERROR_KEY).decode()
        except Exception:  # no store to watch (not started by torchrun), or it is gone: torchrun ends the ranks
            return
        finally:
            store = None  # closed here, not during the interpreter's shutdown
        print(f"{what}: stopping, another rank failed: {message}", file=sys.stderr, flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, daemon=True, name="exit_when_another_rank_fails")
    thread.start()

    def end_watch():
        stop.set()
        thread.join(timeout=5)

    atexit.register(end_watch)


def autodetect_device():
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device_type(requested):
    """The device type to train on: --device's ("cuda:1" gives "cuda"), else the first available."""
    import torch

    device_type = (requested or autodetect_device()).split(":")[0]
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device {requested!r} is not one of cuda, mps, cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; drop --device or use --device cpu")
    if device_type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    return device_type


def synchronize(device_type):
    """Wait for the device's queued work: host timers then measure it."""
    import torch

    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()
