"""
The processes and devices a run uses: which device to train on and waiting for it, and ranks that stop
together when one of them fails alone.
"""

import atexit
import gc
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from machinery.common import UserError, print_line, skip_teardown_at_exit

RANK_ERROR_KEY = "train_gpt2.py/error"
RANK_ACK_KEY = "train_gpt2.py/error_read"  # how many of the other ranks have printed the message
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
        store = _rendezvous_store()
        store.set(RANK_ERROR_KEY, message)
        # torchrun ends every rank once this one exits, perhaps before they have said why: wait (5 s at most)
        # until each has printed the message
        others, deadline = int(os.environ.get("WORLD_SIZE", 1)) - 1, time.time() + 5
        while store.add(RANK_ACK_KEY, 0) < others and time.time() < deadline:
            time.sleep(0.05)
    except Exception:  # best effort: torchrun still ends the other ranks, only later
        pass


def exit_when_another_rank_fails(what):
    """Watch the store twice a second; when another rank has failed, print its message and exit. The watch
    ends, and its store client is closed in its own thread, before the interpreter shuts down: a client still
    inside a call at exit can abort the process ("terminate called without an active exception")."""
    stop = threading.Event()

    def watch():
        store = None
        try:
            store = _rendezvous_store()
            while not store.check([RANK_ERROR_KEY]) or _told_others:
                if stop.wait(0.5):
                    return
            message = store.get(RANK_ERROR_KEY).decode()
            # a failure every rank meets at once (a full disk in a sharded save): this rank's own line may be a
            # moment behind the other's; let it say its own
            if stop.wait(1.0) or _told_others:
                return
        except Exception:  # no store to watch (not started by torchrun), or it is gone: torchrun ends the ranks
            store = None  # closed here, not during the interpreter's shutdown
            return
        print_line(f"{what}: stopping, another rank failed: {message}")
        try:
            store.add(RANK_ACK_KEY, 1)  # said: the failed rank may exit now
        except Exception:
            pass
        store = None
        os._exit(1)

    thread = threading.Thread(target=watch, daemon=True, name="exit_when_another_rank_fails")
    thread.start()

    def end_watch():
        stop.set()
        thread.join(timeout=5)

    atexit.register(end_watch)


def end_process_group(sharded):
    """The process group's end, once every rank is past its last collective; the DDP modules that hold it are
    collected first (they may sit in reference cycles). Under FSDP the group outlives destroy_process_group
    (DTensor's caches keep the device mesh), so the process then ends without the interpreter's teardown
    (skip_teardown_at_exit)."""
    gc.collect()
    dist.destroy_process_group()
    if sharded:
        skip_teardown_at_exit()


def check_restartable():
    """torchrun --max-restarts N restarts every rank when one dies; with its rendezvous store shared with the
    ranks' (the default), a restarted rank can read the address of a rank from the attempt before and never
    connect (pytorch/pytorch#135712; seen here on gloo, torch 2.13). Refused before anything runs."""
    restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0"
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UserError("torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment, or a "
                        "restarted rank may never connect (pytorch#135712): run `TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                        "torchrun ...`")


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


def process_device(requested, device_type, local_rank, ddp):
    """The device this process runs on. Under torchrun each rank takes its LOCAL_RANK's GPU, so an index in
    --device is refused there; outside it, --device cuda:N is GPU N."""
    if device_type != "cuda":
        return device_type
    index = requested.split(":", 1)[1] if requested and ":" in requested else None
    if ddp and index is not None:
        raise UserError(f"--device {requested}: under torchrun each rank uses the GPU of its LOCAL_RANK; pass "
                        "--device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if index is None:
        return f"cuda:{local_rank}"
    if not index.isdigit() or int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPUs "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return f"cuda:{index}"


def single_device(requested):
    """The device of a one-process script (sample.py, app.py): --device, checked, or the first available."""
    return process_device(requested, check_device_type(requested), 0, ddp=False)


def bf16_supported(device_type):
    """Whether bf16 autocast is the default here: on GPUs that compute bf16 themselves. T4 and V100 only
    emulate it (torch.cuda.is_bf16_supported() is true there by default), slower than fp32."""
    return device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def scoring_device(requested, dtype):
    """(device, autocast context or None) for a script that scores a model (hellaswag.py, core.py): under torchrun
    each rank on its own GPU, as train_gpt2.py's ranks train; bf16 where the GPU computes it natively, unless
    dtype ("bf16" or "fp32") says otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device_type = check_device_type(requested)
    device = process_device(requested, device_type, int(os.environ.get("LOCAL_RANK", 0)), world_size > 1)
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dtype = dtype or ("bf16" if bf16_supported(device_type) else "fp32")
    return device, torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bf16" else None


def synchronize(device_type):
    """Wait for the device's queued work: host timers then measure it."""
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()
