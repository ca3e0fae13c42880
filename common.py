"""
Helpers every script here shares: the one-line error, downloads, GPT-2's tokenizer, and device detection.

Nothing in this file is part of the GPT-2 recipe; train_gpt2.py can be read without opening it. It
imports torch, requests and tiktoken only where a function needs them, so that fineweb.py's tokenizer
processes stay light.
"""

import functools
import os


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, no network); printed as one line, no traceback."""


def first_line(e):
    """The first line of an exception's message, for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=None)
def get_encoder():
    """GPT-2's BPE through tiktoken, loaded on first use (it may need the network once)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises plain requests/OS errors when its files cannot be fetched
        raise UserError(f"could not load the GPT-2 tokenizer with tiktoken ({type(e).__name__}); connect "
                        "once to cache it, or set TIKTOKEN_CACHE_DIR to a folder holding its files") from None


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
