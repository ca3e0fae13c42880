"""
The processes and devices a run uses: which device to train on and waiting for it, and ranks that stop
together when one of them fails alone.
"""

import atexit
import os
import sys
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from machinery.common import UserError

RANK_ERROR_KEY = "train_gpt2.py/error"
_told_others = False


def _rendezvous_store():
    """A client of torchrun's key-value store (MASTER_ADDR:MASTER_PORT), of this process's own."""
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
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device_type(requested):
    """The device type to train on: --device's ("cuda:1" gives "cuda"), else the first available."""
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
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()
