"""
Checkpoints and resuming for train_gpt2.py: what a run writes to --log_dir, and how it continues.

model_{step}.pt are the milestones (every --checkpoint_every steps, kept); ckpt_{step}.pt the frequent
resume points (--save_every, --save_every_minutes, a stop signal), rotated by --keep_last. Both hold the
full state of the run at the top of `step`, after `step` updates: weights, AdamW's moments, both data
loaders' positions and every RNG, so a resumed run writes the same log.txt as one never stopped.
Every file is written to a temporary name and renamed, so a crash leaves the old file or the new one.
"""

import contextlib
import os
import pickle
import random
import re
import signal
from dataclasses import asdict

import numpy as np
import torch

from common import UserError, first_line

CHECKPOINT_RE = re.compile(r"^(model|ckpt)_(\d+)\.pt$")
# GPTConfig fields that choose how to compute, not what: left out of checkpoints, free to change on resume
COMPUTE_ONLY_FIELDS = ("attention", "ce_chunk_rows")


def model_config(config):
    """The fields of a GPTConfig that define the function the model computes, as a dict."""
    return {k: v for k, v in asdict(config).items() if k not in COMPUTE_ONLY_FIELDS}


# -----------------------------------------------------------------------------
# Writing and reading one checkpoint


def atomic_torch_save(obj, path):
    """Write to a temporary name, fsync, then rename: a crash leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); the earlier checkpoints are "
                        "intact: free some space, then rerun the same command to resume") from None


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, keys.tolist(), pos, has_gauss, gauss)  # lists, not arrays: weights_only loads them
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, optimizer, step, val_loss, args, train_loader, val_loader, world_size):
    atomic_torch_save({
        "model": model.state_dict(),  # the plain module: no "_orig_mod." or "module." prefixes
        "optimizer": optimizer.state_dict(),
        "config": model_config(model.config),
        "step": step,
        "val_loss": val_loss,
        "args": vars(args),
        "world_size": world_size,
        "data": {"train": train_loader.state_dict(), "val": val_loader.state_dict()},
        "rng": rng_state(),
    }, path)


def load_checkpoint(path, device="cpu"):
    """torch.load with weights_only=True, and a clear error for a missing, truncated or foreign file."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is not a readable train_gpt2.py checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        raise UserError(f"{path} is not a train_gpt2.py checkpoint (no model, config and step in it)")
    return ckpt


def restore_checkpoint(ckpt, model, optimizer, train_batches, val_batches):
    """Put a run's saved state back: weights, AdamW's moments, both loaders' positions, every RNG.
    Returns the last val loss it recorded."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])  # moves the moments to the parameters' device
    train_batches.load_state_dict(ckpt["data"]["train"])
    val_batches.load_state_dict(ckpt["data"]["val"])
    set_rng_state(ckpt["rng"])
    return ckpt["val_loss"]


# -----------------------------------------------------------------------------
# Finding the checkpoint to resume, and checking that it belongs to this run


def list_checkpoints(log_dir):
    """(step, path) of every checkpoint in log_dir, newest first."""
    found = []
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else []:
        m = CHECKPOINT_RE.match(name)
        if m:
            found.append((int(m.group(2)), os.path.join(log_dir, name)))
    return sorted(found, reverse=True)


def find_resume_checkpoint(args, device):
    """The checkpoint to continue from (loaded), or None to start fresh, per --resume."""
    if args.resume == "none" or args.overwrite:
        return None
    if args.resume != "auto":
        return dict(load_checkpoint(args.resume, device), path=args.resume)
    candidates = list_checkpoints(args.log_dir)
    for _, path in candidates:
        try:
            ckpt = load_checkpoint(path, device)
        except UserError as e:
            print(f"warning: skipping {e}")  # a truncated newest file: fall back to the one before
            continue
        return dict(ckpt, path=path)
    if candidates:
        raise UserError(f"no readable checkpoint among the {len(candidates)} in {args.log_dir}; "
                        "pass --resume none --overwrite to start over, or --resume PATH")
    return None


def check_resumable(ckpt, config, args, world_size):
    """Refuse a checkpoint of another model or token stream; report the changes that are allowed."""
    if not {"optimizer", "data", "rng", "args", "world_size"} <= set(ckpt):
        raise UserError(f"{ckpt.get('path', 'the checkpoint')} holds weights only, not a run's full state; "
                        "it cannot be resumed (use --resume none)")
    saved, ours = ckpt["args"], model_config(config)
    if ckpt["config"] != ours:
        diff = ", ".join(f"{k} {v} (this run: {ours.get(k)})" for k, v in ckpt["config"].items() if ours.get(k) != v)
        raise UserError(f"the checkpoint is of another model: {diff}; pass the checkpoint's model flags, "
                        "or --log_dir NEW to start a new run")
    for flag in ("seq_len", "total_batch_size", "shuffle"):
        if saved.get(flag, False) != getattr(args, flag):
            raise UserError(f"the checkpoint was trained with --{flag} {saved[flag]}, this run has "
                            f"{getattr(args, flag)}: the batches would change; pass --{flag} {saved[flag]}")
    notes = []
    if saved["batch_size"] != args.batch_size or ckpt["world_size"] != world_size:
        notes.append(f"-B {saved['batch_size']} x {ckpt['world_size']} processes -> -B {args.batch_size} x "
                     f"{world_size} processes: the same total batch, the token stream continues where it stopped")
    for flag in ("max_steps", "warmup_steps", "max_lr", "min_lr_ratio", "weight_decay", "grad_clip"):
        if saved[flag] != getattr(args, flag):
            notes.append(f"--{flag} changed from {saved[flag]} to {getattr(args, flag)}")
    return notes


# -----------------------------------------------------------------------------
# The run's folder: log.txt and the checkpoints beside it


def truncate_log(log_file, step):
    """Keep only the lines of steps before `step`: the resumed run writes the rest again."""
    if not os.path.exists(log_file):
        return
    with open(log_file) as f:
        kept = [line for line in f if line.split(maxsplit=1)[0].isdigit() and int(line.split()[0]) < step]
    tmp = f"{log_file}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, log_file)


def prepare_log_dir(args, resume_step):
    """
    Resuming: keep the log up to resume_step. Starting fresh: never replace an earlier run's
    checkpoints or log by accident (with --resume auto, a log whose run left no checkpoint is redone).
    Returns the path of log.txt.
    """
    os.makedirs(args.log_dir, exist_ok=True)
    for name in os.listdir(args.log_dir):
        if name.endswith(".tmp"):  # a save or log rewrite that a crash cut short
            os.remove(os.path.join(args.log_dir, name))
    log_file = os.path.join(args.log_dir, "log.txt")
    if resume_step is not None:
        truncate_log(log_file, resume_step)
        return log_file
    previous = [path for _, path in list_checkpoints(args.log_dir)]
    if os.path.exists(log_file):
        previous.insert(0, log_file)
    if previous and args.resume == "none" and not args.overwrite:
        names = ", ".join(os.path.basename(f) for f in previous[:3]) + (" ..." if len(previous) > 3 else "")
        raise UserError(f"{args.log_dir} already holds a run ({names}); drop --resume none to continue it, "
                        "pass --log_dir NEW_DIR, or --overwrite to delete it and start over")
    for f in previous:
        os.remove(f)
    open(log_file, "w").close()
    return log_file


def append_log(log_file, line):
    """One line of log.txt; a None log_file (a rank other than 0, or --benchmark) writes nothing."""
    if log_file:
        with open(log_file, "a") as f:
            f.write(line + "\n")


def rotate_checkpoints(log_dir, keep_last, step):
    """Keep the newest keep_last resume points up to `step`; milestones stay. Files past `step` (left by
    an abandoned or unreadable later save) are not counted: the run overwrites them when it gets there."""
    resume_points = [path for s, path in list_checkpoints(log_dir)
                     if s <= step and os.path.basename(path).startswith("ckpt_")]
    for path in resume_points[keep_last:]:
        os.remove(path)


# -----------------------------------------------------------------------------
# Stop signals: SIGTERM (preemption, torchrun shutting down) or Ctrl-C ends the run at the next step, saved


@contextlib.contextmanager
def stop_signals_caught():
    """Yields the list that SIGTERM and SIGINT are appended to, instead of ending the process; a second
    signal of the same kind ends it at once, the default way. The old handlers come back on exit."""
    received = []

    def request_stop(signum, frame):
        received.append(signum)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
