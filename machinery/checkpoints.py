"""
Checkpoints and resuming for train_gpt2.py: what a run writes to --log_dir, and how it continues.

model_{step}.pt are the milestones (every --checkpoint_every steps, kept); ckpt_{step}.pt the frequent
resume points (--save_every, --save_every_minutes, a stop signal), rotated by --keep_last; the
Checkpointer decides which is due at each step, the one place that does. Both hold the
full state of the run at the top of `step`, after `step` updates: weights, AdamW's moments, both data
loaders' positions and every RNG, so a resumed run writes the same log.txt as one never stopped.
Every file is written to a temporary name and renamed, so a crash leaves the old file or the new one.
Under --fsdp a resume point is a folder, ckpt_{step}/: each rank writes its shards of the weights and the
optimizer's state there with torch.distributed.checkpoint (which reads them back at any number of ranks),
and rank 0 the rest in state.pt; milestones stay whole single files, gathered from the shards.
"""

import contextlib
import os
import random
import re
import shutil
import signal
import time
import zlib
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist

from machinery import sharding

from machinery.common import (RunDiverged, UserError, atomic_write, file_fingerprint, first_line, lock_folder,
                              unusable_folder, write_failure)

CHECKPOINT_RE = re.compile(r"^(model|ckpt)_(\d+)(\.pt)?$")  # no .pt: a sharded one (--fsdp), a folder
# what a sharded folder holds (and the temporary names torch and this script write there)
SHARDED_FILE_RE = re.compile(r"^(\.metadata|__(\d+)_\d+\.distcp|state\.pt)(\.tmp)?$")
STATE_NAME = "state.pt"  # in a sharded folder: everything but the weights and the optimizer's state
LOCK_NAME = "train_gpt2.lock"  # held by the run that owns the folder; also marks it as one this script ran in
DIVERGED_NAME = "diverged.txt"  # written when the run diverges: rerunning the same command is refused
OWN_TEMP_RE = re.compile(r"^((model|ckpt)_\d+\.pt|log\.txt)\.tmp$")  # the temporary names this script writes
SHARDED_TEMP_RE = re.compile(r"^ckpt_\d+\.tmp$")  # a sharded save's temporary folder (not a file by that name)
# a whole log.txt line, newline included: anything else (a line torn by a crash or a full disk, zeros a crash left
# in an unwritten page) is never kept on resume, whatever its first characters are
LOG_LINE_RE = re.compile(r"^(\d+) (train|val|hella|core) (-?\d+\.\d+|-?inf|nan)\n$")
# GPTConfig fields that choose how to compute, not what: left out of checkpoints, free to change on resume
COMPUTE_ONLY_FIELDS = ("attention", "ce_chunk_rows")


def model_config(config):
    """The fields of a GPTConfig that define the function the model computes, as a dict."""
    return {k: v for k, v in asdict(config).items() if k not in COMPUTE_ONLY_FIELDS}


# -----------------------------------------------------------------------------
# Writing and reading one checkpoint


def atomic_torch_save(obj, path):
    """torch.save through atomic_write: a crash leaves the old file or the new one, never half."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        raise UserError(f"could not write checkpoint {path} ({write_failure(path, e)}); the earlier checkpoints "
                        "are intact: free some space, then rerun the same command to resume") from None


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


def payload_crc(obj, crc=0):
    """A CRC-32 of everything in a checkpoint (tensors by their bytes, the rest by repr), saved inside it and
    checked on load: a flipped bit anywhere in the weights, moments or state is found."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode(), crc)
        return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    if isinstance(obj, dict):
        for k, v in obj.items():
            crc = payload_crc(v, payload_crc(k, crc))
        return crc
    if isinstance(obj, (list, tuple)):
        crc = zlib.crc32(type(obj).__name__.encode(), crc)
        for v in obj:
            crc = payload_crc(v, crc)
        return crc
    return zlib.crc32(repr(obj).encode(), crc)


def data_identity(loaders):
    """{split: {shard file name: fingerprint}} of the shards the loaders read, taken when they open them."""
    return {split: {os.path.basename(p): file_fingerprint(p) for p in loader.shards}
            for split, loader in loaders.items()}


def check_same_data(ckpt, identity, args):
    """Refuse to resume onto other data than the checkpoint's (another --data_dir, a shard replaced in place),
    unless --new_data says it is meant; returns the notes to print."""
    saved = ckpt.get("data_identity")
    if saved is None or saved == identity:  # checkpoints from before fingerprints were kept: nothing to compare
        return []
    split = next(s for s in identity if saved.get(s) != identity[s])
    changed = sorted(set(saved.get(split, {})) ^ set(identity[split])) or \
        sorted(n for n in identity[split] if saved[split].get(n) != identity[split][n])
    what = f"its {split} shards differ from --data_dir {args.data_dir}'s (first: {changed[0]})"
    if not args.new_data:
        raise UserError(f"the checkpoint was trained on other data: {what}; resume with its data "
                        f"(--data_dir {ckpt['args']['data_dir']}), or pass --new_data to go on with this data")
    return [f"--new_data: {what}; training goes on with this data, read from its start"]


def load_checkpoint(path, device="cpu", weights=True):
    """torch.load with weights_only=True, and a clear error for a missing, truncated, corrupt or foreign file.
    A sharded folder (--fsdp's resume points): its state.pt, with "sharded" set; with `weights`, also the
    whole model's tensors read from every rank's shards (as "model", for the tools that score or sample)."""
    if os.path.isdir(path):
        return load_sharded_checkpoint(path, weights)
    ckpt = load_pt(path, device)
    if not {"model", "config", "step"} <= set(ckpt):
        raise UserError(f"{path} is not a train_gpt2.py checkpoint (no model, config and step in it)")
    return ckpt


def load_pt(path, device):
    """One torch.save file of this script's, its checksum checked."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # a damaged file can fail in the zip reader, the unpickler or torch: whatever it is
        raise UserError(f"{path} is not a readable train_gpt2.py checkpoint ({type(e).__name__}: "
                        f"{first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a train_gpt2.py checkpoint (no model, config and step in it)")
    if "checksum" in ckpt and payload_crc({k: v for k, v in ckpt.items() if k != "checksum"}) != ckpt["checksum"]:
        raise UserError(f"{path} is corrupt: its contents do not match the checksum saved with them")
    return ckpt


def load_sharded_checkpoint(path, weights):
    """A folder written by write_sharded: state.pt, and every rank's shard file that its world size promises."""
    names = os.listdir(path)
    if STATE_NAME not in names or ".metadata" not in names:
        raise UserError(f"{path} is a folder without .metadata and {STATE_NAME}: not a sharded train_gpt2.py "
                        "checkpoint (those are written by --fsdp); pass a checkpoint file or folder")
    ckpt = load_pt(os.path.join(path, STATE_NAME), "cpu")
    ranks = {int(m.group(2)) for n in names if (m := SHARDED_FILE_RE.match(n)) and m.group(2) and not m.group(3)}
    if not {"config", "step", "world_size"} <= set(ckpt) or ranks != set(range(ckpt["world_size"])):
        raise UserError(f"{path} is incomplete: it holds the shards of ranks {sorted(ranks)} of "
                        f"{ckpt.get('world_size', '?')}; resume from another checkpoint (--resume PATH)")
    for name, crc in ckpt.get("shard_crcs", {}).items():  # (folders from before they were kept: none)
        if file_crc(os.path.join(path, name)) != crc:
            raise UserError(f"{path} is corrupt: {name} does not match the checksum saved with it (cut short, or a "
                            "bit flipped); resume from another checkpoint (--resume PATH)")
    ckpt = dict(ckpt, sharded=True)
    if weights:
        ckpt["model"] = read_sharded_weights(path)
    return ckpt


def file_crc(path):
    """A CRC-32 of a file's bytes (None when it is missing)."""
    crc = 0
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                crc = zlib.crc32(block, crc)
    except FileNotFoundError:
        return None
    return crc


def shard_crcs(folder, writer):
    """{file name: CRC-32} of every file a sharded save wrote into folder: each rank checks its own shard files
    and rank 0 (the writer, which wrote .metadata) gathers them all; None on the other ranks."""
    rank = dist.get_rank()
    mine = {n: file_crc(os.path.join(folder, n)) for n in os.listdir(folder)
            if (m := SHARDED_FILE_RE.match(n)) and m.group(2) == str(rank) and not m.group(3)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if not writer:
        return None
    return dict(sorted({k: v for part in gathered for k, v in part.items()}.items()),
                **{".metadata": file_crc(os.path.join(folder, ".metadata"))})


def read_sharded_weights(path):
    """The model's whole tensors from a sharded folder, read in this one process."""
    try:
        return sharding.read_whole_weights(path)
    except Exception as e:  # a damaged or missing shard file
        raise UserError(f"{path}: its shards are unreadable ({type(e).__name__}: {first_line(e)})") from None


def sharded_failure(e, path):
    """What failed in a sharded save, in words, as a whole file's failure is worded (write_failure): the first
    failing rank's OS error (a full disk: "No space left on device"), else its first line and the space left."""
    failures = getattr(e, "failures", None)  # CheckpointException's: {rank: (the exception, its traceback)}
    if not failures:
        return write_failure(path, e)
    rank, first = min(failures.items(), key=lambda item: item[0])
    first = first[0] if isinstance(first, tuple) else first
    cause = first
    while cause is not None and not (isinstance(cause, OSError) and cause.strerror):
        cause = cause.__cause__ or cause.__context__
    return f"rank {rank}: {write_failure(path, cause or first)}"


def checkpoint_path(log_dir, name, step, sharded=False):
    """model_{step}.pt / ckpt_{step}.pt, or a sharded resume point's folder, ckpt_{step}."""
    return os.path.join(log_dir, f"{name}_{step:05d}" + ("" if sharded else ".pt"))


def torch_optimizers(optimizer):
    """The torch optimizers behind `optimizer` (several under Muon: variants.Optimizers), for torch's
    distributed state-dict functions (sharding.sharded_state)."""
    return list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else optimizer


def shard_optimizer_state(state, optimizer):
    """A .pt checkpoint's whole optimizer state, each moment of a sharded parameter cut to this rank's shard
    (under --fsdp; for a plain model, the state as it is). Muon's two optimizers each get their own."""
    if hasattr(optimizer, "optimizers"):
        if set(state) != set(optimizer.optimizers):
            return state  # another --optimizer's: Optimizers.load_state_dict says so
        return {name: shard_optimizer_state(state[name], opt) for name, opt in optimizer.optimizers.items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return dict(state, state={i: {k: sharding.shard_like(v, params[i]) if torch.is_tensor(v) and v.shape ==
                                  params[i].shape else v for k, v in moments.items()}
                              for i, moments in state["state"].items()})


# -----------------------------------------------------------------------------
# The policy: when the run saves, what, and putting it back


class Checkpointer:
    """
    Owns when the run saves and what it writes, so the training loop asks once per step. Given the
    run's stateful parts (model, optimizer, the train and val loaders), at the top of `step`:
    model_{step}.pt every --checkpoint_every steps and at the last step (milestones, kept); otherwise
    ckpt_{step}.pt every --save_every steps, every --save_every_minutes (rank 0's clock, agreed by all
    ranks), and on a stop signal, rotated by --keep_last. Only rank 0 writes files, and --benchmark writes
    nothing; under --fsdp every rank takes part (its shards), and the resume points are ckpt_{step}/ folders.
    """

    def __init__(self, args, model, optimizer, loaders, start_step, writer, world_size, identity):
        self.args, self.model, self.optimizer, self.loaders = args, model, optimizer, loaders
        self.start_step = start_step  # the resume point this run began from is not written again
        self.writer = writer and not args.benchmark  # rank 0
        self.sharded = sharding.is_sharded(model)
        self.takes_part = (writer or self.sharded) and not args.benchmark
        self.world_size, self.identity = world_size, identity  # recorded: resuming checks them
        self.wandb_id = None  # --wandb: a resumed run goes on logging into the same W&B run
        self.last_save = time.time()

    def timed_save_due(self):
        """Whether --save_every_minutes have passed since the last save: asked at the end of a step, the
        answer travels to every rank with the step's loss, and the save happens at the top of the next."""
        minutes = self.args.save_every_minutes
        return self.writer and 0 < minutes * 60 <= time.time() - self.last_save

    def due(self, step, last_step, stop=False, timed=False):
        """The name of the file due at the top of `step` ("model", "ckpt") or None; on a stop, the resume point."""
        args = self.args
        if stop:
            return "ckpt"
        if step > 0 and (step % args.checkpoint_every == 0 or last_step):
            return "model"
        if step > self.start_step and (timed or (args.save_every > 0 and step % args.save_every == 0)):
            return "ckpt"
        return None

    def save(self, step, val_loss, last_step=False, stop=False, timed=False):
        """Write what is due at the top of `step` (see due()); returns its path, or None."""
        name = self.due(step, last_step, stop, timed)
        if name is None or not self.takes_part:
            return None
        sharded = self.sharded and name == "ckpt"
        path = checkpoint_path(self.args.log_dir, name, step, sharded)
        self.check_finite(path, step)
        (self.write_sharded if sharded else self.write)(path, step, val_loss)
        self.last_save = time.time()
        if self.writer:
            print(f"saved {path}")
            if name == "ckpt":
                rotate_checkpoints(self.args.log_dir, self.args.keep_last, step)
        return path

    def check_finite(self, path, step):
        """A diverged state is never written: it would rotate the last healthy resume points away. Under
        --fsdp each rank looks at its shards and all agree."""
        finite = all(torch.isfinite(sharding.local(t)).all() for t in self.model.state_dict().values())
        if self.sharded:
            flag = torch.tensor(float(finite), device=sharding.local(next(self.model.parameters())).device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag.item() == 1.0
        if not finite:
            raise UserError(f"not saving {path}: the weights hold NaN or inf, the run diverged before step {step}; "
                            f"lower --max_lr (now {self.args.max_lr}) and rerun to resume from the last checkpoint")

    def run_state(self, step, val_loss):
        """Everything the next step depends on but the weights and the optimizer's state."""
        state = {
            "config": model_config(self.model.config),
            "step": step,
            "val_loss": val_loss,
            "args": vars(self.args),
            "world_size": self.world_size,
            "data": {split: loader.state_dict() for split, loader in self.loaders.items()},
            "data_identity": self.identity,
            "rng": rng_state(),
        }
        if self.wandb_id is not None:
            state["wandb_id"] = self.wandb_id
        return state

    def write(self, path, step, val_loss):
        """One file (rank 0's) with everything the next step depends on, and a checksum of it. Under --fsdp
        the weights and moments are gathered whole from every rank first: the same file a DDP run writes."""
        model_state, optimizer_state = self.model.state_dict(), self.optimizer.state_dict()
        if self.sharded:
            model_state = self.model.state_dict(keep_vars=True)  # the parameters: the tied one is met twice
            model_state, optimizer_state = sharding.full_tensors((model_state, optimizer_state))
        if not self.writer:
            return
        # the plain module's names: no "_orig_mod." or "module." prefixes
        payload = {"model": model_state, "optimizer": optimizer_state, **self.run_state(step, val_loss)}
        atomic_torch_save(dict(payload, checksum=payload_crc(payload)), path)

    def write_sharded(self, path, step, val_loss):
        """--fsdp's resume point: a folder in which every rank writes its shards (torch.distributed.checkpoint)
        and rank 0 state.pt, made under a temporary name and renamed when whole, as the files are."""
        temp = path + ".tmp"
        if self.writer:
            remove_checkpoint(temp)  # one that a crash cut short
            os.makedirs(temp)
        dist.barrier()  # the folder exists before any rank writes in it
        try:
            sharding.save_sharded(sharding.sharded_state(self.model, torch_optimizers(self.optimizer)), temp)
            crcs = shard_crcs(temp, self.writer)  # a flipped bit or a cut file is found on resume
        except sharding.checkpoint_errors() as e:  # on every rank: torch gathers each rank's failure
            failure = sharded_failure(e, path)
            if self.writer:
                remove_checkpoint(temp)  # the space it took, back
            raise UserError(f"could not write checkpoint {path} ({failure}); the earlier checkpoints are intact: "
                            "free some space, then rerun the same command to resume") from None
        if self.writer:
            state = dict(self.run_state(step, val_loss), shard_crcs=crcs)
            atomic_torch_save(dict(state, checksum=payload_crc(state)), os.path.join(temp, STATE_NAME))
            remove_checkpoint(path)  # left by an abandoned later save: this run has come back to its step
            os.rename(temp, path)

    def restore(self, ckpt):
        """Put a run's saved state back: weights, the optimizer's moments, both loaders' positions (unless the
        data is new, see check_same_data), every RNG. Returns the last val loss it recorded. A sharded
        checkpoint is read at this run's world size and layout, sharded or not; a whole one is cut to shards."""
        # the saved param groups replace the new ones: keep this run's flags (--weight_decay, the lr shares)
        flags = [{k: g[k] for k in ("weight_decay", "lr_scale") if k in g} for g in self.optimizer.param_groups]
        if ckpt.get("sharded"):
            try:
                sharding.load_sharded(self.model, torch_optimizers(self.optimizer), ckpt["path"])
            except sharding.checkpoint_errors() as e:
                raise UserError(f"{ckpt['path']}: its shards are unreadable ({first_line(e)[:200]}); resume from "
                                "another checkpoint (--resume PATH)") from None
        else:
            like = self.model.state_dict()
            self.model.load_state_dict({k: sharding.shard_like(v, like[k]) if k in like else v
                                        for k, v in ckpt["model"].items()})
            # moves the moments to the parameters' device
            self.optimizer.load_state_dict(shard_optimizer_state(ckpt["optimizer"], self.optimizer))
        for group, kept in zip(self.optimizer.param_groups, flags):
            group.update(kept)
        if ckpt.get("data_identity", self.identity) == self.identity:
            for split, loader in self.loaders.items():
                loader.load_state_dict(ckpt["data"][split])
        set_rng_state(ckpt["rng"])
        return ckpt["val_loss"]


# -----------------------------------------------------------------------------
# Finding the checkpoint to resume, and checking that it belongs to this run


def list_checkpoints(log_dir):
    """(step, path) of every checkpoint in log_dir, newest first."""
    found = []
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else []:
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(log_dir, name)
        if m and (m.group(3) or is_own_sharded(path)):
            found.append((int(m.group(2)), path))
    return sorted(found, reverse=True)


def is_own_sharded(path):
    """A folder that holds only what write_sharded writes: ours to read, rotate and delete. Any other folder
    by such a name is left alone."""
    return os.path.isdir(path) and not os.path.islink(path) and all(SHARDED_FILE_RE.match(n)
                                                                      for n in os.listdir(path))


def is_checkpoint(path):
    """A path the tools read as this script's checkpoint: a .pt file, or a sharded folder (--fsdp's)."""
    return path.endswith(".pt") or (is_own_sharded(path) and os.path.exists(os.path.join(path, STATE_NAME)))


def remove_checkpoint(path):
    """Delete a checkpoint this script wrote: a file, or a sharded folder (only if it is one of ours)."""
    if os.path.isdir(path) and not os.path.islink(path):
        if is_own_sharded(path):
            shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def find_resume_checkpoint(args, device):
    """The checkpoint to continue from (loaded), or None to start fresh, per --resume."""
    if args.resume == "none" or args.overwrite:
        return None
    if args.resume != "auto":
        return dict(load_checkpoint(args.resume, device, weights=False), path=args.resume)
    candidates = list_checkpoints(args.log_dir)
    for _, path in candidates:
        try:
            ckpt = load_checkpoint(path, device, weights=False)  # a sharded one's shards: read into the model
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
    if not {"data", "rng", "args", "world_size"} <= set(ckpt) or not ("optimizer" in ckpt or ckpt.get("sharded")):
        raise UserError(f"{ckpt.get('path', 'the checkpoint')} holds weights only, not a run's full state; "
                        "it cannot be resumed (use --resume none)")
    saved, ours = ckpt["args"], model_config(config)
    # fields added since the checkpoint was written take their defaults (e.g. arch: gpt2)
    theirs = {**model_config(type(config)()), **ckpt["config"]}
    if theirs != ours:
        diff = ", ".join(f"{k} {v} (this run: {ours.get(k)})" for k, v in theirs.items() if ours.get(k) != v)
        raise UserError(f"the checkpoint is of another model: {diff}; pass the checkpoint's model flags "
                        f"(--recipe {saved.get('recipe', 'gpt2')}?), or --log_dir NEW to start a new run")
    if saved.get("optimizer", "adamw") != args.optimizer:
        raise UserError(f"the checkpoint was trained with --optimizer {saved.get('optimizer', 'adamw')}, this run has "
                        f"{args.optimizer}: its optimizer state would not fit; pass --optimizer "
                        f"{saved.get('optimizer', 'adamw')}, or --log_dir NEW to start a new run")
    for flag in ("seq_len", "total_batch_size", "shuffle"):
        if saved.get(flag, False) != getattr(args, flag):
            raise UserError(f"the checkpoint was trained with --{flag} {saved[flag]}, this run has "
                            f"{getattr(args, flag)}: the batches would change; pass --{flag} {saved[flag]}")
    notes = []
    if saved["batch_size"] != args.batch_size or ckpt["world_size"] != world_size:
        notes.append(f"-B {saved['batch_size']} x {ckpt['world_size']} processes -> -B {args.batch_size} x "
                     f"{world_size} processes: the same total batch, the token stream continues where it stopped")
    defaults = {"schedule": "cosine", "cooldown_frac": args.cooldown_frac, "adam_lr": args.adam_lr,
                "embed_lr": args.embed_lr}  # flags older checkpoints did not have
    for flag in ("max_steps", "warmup_steps", "max_lr", "min_lr_ratio", "weight_decay", "grad_clip", "schedule",
                 "cooldown_frac", "adam_lr", "embed_lr"):
        if saved.get(flag, defaults.get(flag)) != getattr(args, flag):
            notes.append(f"--{flag} changed from {saved.get(flag, defaults.get(flag))} to {getattr(args, flag)}")
    if saved["max_steps"] != args.max_steps:
        notes.append(f"the learning-rate schedule is recomputed over {args.max_steps} steps, so from step "
                     f"{ckpt['step']} on it follows the new curve, not the one the run was on (after a finished "
                     f"run's decay it rises again); to keep the old curve, pass --max_steps {saved['max_steps']}")
    return notes


# -----------------------------------------------------------------------------
# The run's folder: log.txt and the checkpoints beside it


def truncate_log(log_file, step):
    """Keep only the whole lines of steps before `step`: the resumed run writes the rest again. A line cut
    short by a crash or a full disk (no newline at its end) is dropped, never continued. No log yet (another
    run's checkpoint resumed into a new folder): an empty one, which the run fills from `step` on."""
    if not os.path.exists(log_file):
        open(log_file, "w").close()
        return
    with open(log_file) as f:
        kept = "".join(line for line in f if (m := LOG_LINE_RE.match(line)) and int(m.group(1)) < step)
    atomic_write(log_file, lambda f: f.write(kept.encode()))


@contextlib.contextmanager
def claim_log_dir(args, holder):
    """
    A run owns its --log_dir: rank 0 (`holder`) makes it and holds its lock file for the run's life, so a
    second run there (or a rerun racing ranks left over from a killed launcher) stops with one line.
    Yields whether train_gpt2.py had run in this folder before (its lock file was there already).
    """
    if not holder:
        yield None
        return
    was_ours = os.path.exists(os.path.join(args.log_dir, LOCK_NAME))
    fd = lock_folder(args.log_dir, LOCK_NAME, "--log_dir")
    try:
        yield was_ours
    finally:
        os.close(fd)  # the lock goes with it


def finished_at(log_dir, max_steps):
    """The last step of a run in log_dir that got to max_steps (its log has that step's train line), or None."""
    path = os.path.join(log_dir, "log.txt")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        steps = [int(m.group(1)) for line in f if (m := LOG_LINE_RE.match(line)) and m.group(2) == "train"]
    return max(steps) if steps and max(steps) >= max_steps - 1 else None


def prepare_log_dir(args, resumed_from, resume_step, was_ours):
    """
    Resuming: keep the log up to resume_step. Starting fresh: never replace an earlier run's checkpoints
    or log by accident. Only what a run writes is ever deleted (its checkpoints, its temporary files, and
    with --resume auto a log of its own that no checkpoint came of); anything else in --log_dir stays.
    Returns the path of log.txt.
    """
    try:
        return _prepare_log_dir(args, resumed_from, resume_step, was_ours)
    except OSError as e:
        raise unusable_folder("--log_dir", args.log_dir, e) from None


def _prepare_log_dir(args, resumed_from, resume_step, was_ours):
    for name in os.listdir(args.log_dir):
        path = os.path.join(args.log_dir, name)
        if OWN_TEMP_RE.match(name) or (SHARDED_TEMP_RE.match(name) and is_own_sharded(path)):
            remove_checkpoint(path)  # a save or log rewrite that a crash cut short
    problem = log_dir_problem(args, resumed_from, resume_step, was_ours)
    if problem:
        raise UserError(problem)
    log_file = os.path.join(args.log_dir, "log.txt")
    if resume_step is not None:
        truncate_log(log_file, resume_step)
        return log_file
    for f in previous_run(args.log_dir):
        remove_checkpoint(f)
    open(log_file, "w").close()
    return log_file


def previous_run(log_dir):
    """What an earlier run left in log_dir: its log.txt, then its checkpoints, newest first, and its divergence
    note if it has one."""
    log_file, diverged = os.path.join(log_dir, "log.txt"), os.path.join(log_dir, DIVERGED_NAME)
    return [log_file] * os.path.exists(log_file) + [path for _, path in list_checkpoints(log_dir)] + \
        [diverged] * os.path.exists(diverged)


def mark_diverged(log_dir, message):
    """Leave the divergence's message in log_dir, so that a restart (torchrun's, a shell loop's) of the same
    command stops at once instead of diverging again."""
    atomic_write(os.path.join(log_dir, DIVERGED_NAME), lambda f: f.write((message + "\n").encode()))


def check_not_diverged(args):
    """A run that diverged is not resumed by --resume auto: the same flags would diverge again."""
    path = os.path.join(args.log_dir, DIVERGED_NAME)
    if args.resume != "auto" or args.overwrite or not os.path.exists(path):
        return
    with open(path) as f:
        what = f.read().strip().split(";")[0]
    raise RunDiverged(f"{what}, and is not resumed with the same command: change what made it diverge (e.g. a "
                      f"lower --max_lr), delete {path}, then rerun; or pass --overwrite to start over")


def log_dir_problem(args, resumed_from, resume_step, was_ours):
    """Why prepare_log_dir refuses --log_dir, or None; it only reads (the preflight asks it too)."""
    if not os.path.isdir(args.log_dir):
        return None  # made when the run claims it
    log_file = os.path.join(args.log_dir, "log.txt")
    previous = previous_run(args.log_dir)
    names = ", ".join(os.path.basename(f) for f in previous[:3]) + (" ..." if len(previous) > 3 else "")
    if resume_step is not None:
        if previous and not os.path.samefile(os.path.dirname(os.path.abspath(resumed_from)), args.log_dir):
            return (f"{args.log_dir} already holds a run ({names}), and --resume {resumed_from} is another's; "
                    "resume it into a new --log_dir, or drop --resume to continue this one")
        return None
    if previous and args.resume == "none" and not args.overwrite:
        return (f"{args.log_dir} already holds a run ({names}); drop --resume none to continue it, pass "
                "--log_dir NEW_DIR, or --overwrite to delete it and start over")
    if os.path.exists(log_file) and not args.overwrite and not (was_ours and log_is_ours(log_file)):
        return f"{log_file} was not written by train_gpt2.py in this folder; pass --log_dir NEW_DIR, or --overwrite " \
               "to replace it"
    return None


def log_is_ours(log_file):
    """Every line is a whole log.txt line of this script's (a torn last one aside)."""
    with open(log_file) as f:
        lines = f.readlines()
    if lines and not lines[-1].endswith("\n"):
        lines.pop()
    return all(LOG_LINE_RE.match(line) for line in lines)


def append_log(log_file, line):
    """One line of log.txt, in one write; a None log_file (a rank other than 0, or --benchmark) writes nothing.
    A write that fails part way leaves a line without its newline, which a resume drops."""
    if not log_file:
        return
    data = (line + "\n").encode()
    try:
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(28, os.strerror(28))  # a short write: the disk filled up mid-line
    except OSError as e:
        raise UserError(f"could not append to {log_file} ({write_failure(log_file, e)}); free some space, then "
                        "rerun the same command to resume") from None


def rotate_checkpoints(log_dir, keep_last, step):
    """Keep the newest keep_last resume points up to `step`; milestones stay. Files past `step` (left by
    an abandoned or unreadable later save) are not counted: the run overwrites them when it gets there."""
    resume_points = [path for s, path in list_checkpoints(log_dir)
                     if s <= step and os.path.basename(path).startswith("ckpt_")]
    for path in resume_points[keep_last:]:
        remove_checkpoint(path)


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
