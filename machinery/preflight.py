"""
--preflight: every phase of the real run once, on its own device, data, model and world size, then what the
whole run will cost. A run that fails at its first evaluation or first save fails here instead, in a minute.

It trains in a temporary folder (TMPDIR's) that it deletes at the end, and writes nothing to --log_dir: that
folder is only checked (usable, and room on its disk for what the run keeps). The phases, in order: inputs
(the flags, data, tokenizer, HellaSwag, a checkpoint to resume) -> setup (model, optimizer, loaders, DDP) ->
first step (compiles) -> steps (timed) -> evaluation (val loss, HellaSwag on a few hundred examples, the
samples) -> CORE (with --core_every: one pass) -> disk -> checkpoint (a resume point saved) -> resume (loaded
into a fresh model and optimizer: the next steps give the losses the run itself gave) -> ranks (the same
weights on every rank, and the link's all-reduce speed). Then the summary: tok/s, MFU, peak memory, link GB/s,
the run's projected time and disk.

The recipe's own functions do the work: `recipe` is train_gpt2 itself, passed in (it imports this module, so
importing it here would be a cycle).
"""

import argparse
import contextlib
import gc
import io
import os
import shutil
import signal
import tempfile
import time
import traceback

import torch
import torch.distributed as dist

from machinery import checkpoints, sharding, speed
from machinery.common import AnotherRankFailed, UserError, first_line
from machinery.runtime import end_process_group, synchronize

TIMED_STEPS = 3  # after the first step, which compiles
RESUME_STEPS = 2  # the first checks the weights and data position, the second the optimizer's moments
HELLASWAG_EXAMPLES = 200  # "a few hundred": every code path, in seconds
GPU_LOSS_TOLERANCE = 1e-3  # GPU kernels may sum in another order from one run to the next; CPU is exact
LOG_LINE_BYTES = 24  # "19072 train 3.071234\n" and its kin


class Phases:
    """Runs each phase and times it: `with phases("name"):`. A failure becomes one line naming the phase
    (an unexpected exception's traceback is printed above it)."""

    def __init__(self, master, out_of_memory_error):
        self.master, self.out_of_memory_error = master, out_of_memory_error  # the run's one line, naming a -B
        self.device_type, self.seconds = "cpu", {}

    @contextlib.contextmanager
    def __call__(self, name):
        t0 = time.time()
        try:
            yield
            synchronize(self.device_type)
        except UserError as e:
            raise type(e)(f"preflight failed at {name}: {e}") from None
        except Exception as e:
            if speed.out_of_memory(e):
                raise UserError(f"preflight failed at {name}: {self.out_of_memory_error(e)}") from None
            if peer_lost(e):  # not this rank's fault: no traceback of its own
                raise AnotherRankFailed(f"preflight failed at {name}: another rank died (this one's connection to "
                                        f"it broke: {first_line(e)[:120]}); that rank's error, if it left one, is "
                                        "above") from None
            traceback.print_exc()
            raise UserError(f"preflight failed at {name}: {type(e).__name__}: {first_line(e)}") from None
        self.seconds[name] = time.time() - t0
        if self.master:
            print(f"preflight: {name} ok ({self.seconds[name]:.1f}s)", flush=True)


def peer_lost(e):
    """A collective failed because another rank is gone: gloo's and NCCL's words for a closed connection."""
    text = str(e)
    return isinstance(e, dist.DistBackendError) or any(
        words in text for words in ("Connection reset by peer", "Connection closed by peer", "Broken pipe"))


@contextlib.contextmanager
def stopped_by_sigterm():
    """SIGTERM raises a UserError that the phase running names: torchrun sends it to every rank when one has
    failed, and a rank killed by it said nothing at all. Any later SIGTERM is ignored, so the line gets out."""
    received = []

    def stop(signum, frame):
        received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise AnotherRankFailed("stopped by SIGTERM: torchrun stops every rank when one fails (that rank's error, if "
                                "it left one, is above), or someone asked it to stop")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        if not received:
            signal.signal(signal.SIGTERM, previous)


def run(args, recipe):
    """The preflight of `args`' run; returns 0 when every phase passed (a failure raises UserError)."""
    real = argparse.Namespace(**vars(args))  # the run as asked for: its projections and its --log_dir
    phases = Phases(int(os.environ.get("RANK", 0)) == 0, lambda e: recipe.out_of_memory_error(real, e))
    try:
        with stopped_by_sigterm():
            return run_phases(args, real, recipe, phases)
    except AnotherRankFailed as e:  # between two phases: named by the last one that passed
        if str(e).startswith("preflight failed"):
            raise
        raise AnotherRankFailed(f"preflight failed after {list(phases.seconds)[-1] if phases.seconds else 'start'}: "
                                f"{e}") from None


def run_phases(args, real, recipe, phases):
    """run()'s body: inputs, the training phases in a temporary folder, the report."""
    with phases("inputs"):
        compute = recipe.compute_init(args)
        phases.device_type = compute.device_type
        inputs = recipe.check_inputs(args, compute)
        done = recipe.run_complete(real, inputs.ckpt)
        if not done:
            check_log_dir(real, inputs)
            recipe.init_distributed(compute, inputs.ckpt["step"] if inputs.ckpt else 0)
            folder = temporary_folder(compute)
    if done:  # as the run itself would say, and exit 0
        compute.print0(f"preflight: nothing to check: {done}")
        return 0
    try:
        args.log_dir, args.wandb, args.overwrite = folder, False, False
        args.hellaswag_limit = min(args.hellaswag_limit or HELLASWAG_EXAMPLES, HELLASWAG_EXAMPLES)
        with checkpoints.claim_log_dir(args, holder=compute.master) as was_ours:
            report = train_phases(args, real, recipe, compute, inputs, phases, was_ours)
        if compute.master:
            print_report(report, real, phases, recipe.duration)
        if compute.ddp:
            dist.barrier()  # every rank is done with the folder before rank 0 deletes it
            end_process_group(args.fsdp)
    finally:
        if compute.master:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


def check_log_dir(args, inputs):
    """--log_dir is a folder this run can write in (or make), and the real run would accept what is in it."""
    folder = os.path.abspath(args.log_dir)
    existing = nearest_existing(folder)
    if not os.path.isdir(existing):
        raise UserError(f"--log_dir {args.log_dir}: {existing} is a file, not a folder; pass another --log_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--log_dir {args.log_dir}: {existing} is not writable by this user; pass another --log_dir")
    was_ours = os.path.exists(os.path.join(folder, checkpoints.LOCK_NAME))
    ckpt = inputs.ckpt
    problem = checkpoints.log_dir_problem(args, ckpt and ckpt["path"], ckpt["step"] if ckpt else None, was_ours)
    if problem:
        raise UserError(problem)


def nearest_existing(path):
    """path, or the nearest folder above it that exists (where a --log_dir yet to be made will be)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def temporary_folder(compute):
    """Rank 0 makes the folder; every rank must see it (to load the checkpoint the resume phase saves)."""
    folder = [tempfile.mkdtemp(prefix="train_gpt2-preflight-") if compute.master else None]
    if compute.ddp:
        dist.broadcast_object_list(folder, src=0)
    if not os.path.isdir(folder[0]):
        raise UserError(f"rank {compute.rank} cannot see rank 0's temporary folder {folder[0]}: point TMPDIR at "
                        "storage that every node shares (as --log_dir must be)")
    return folder[0]


def train_phases(args, real, recipe, compute, inputs, phases, was_ours):
    """From the model's setup to the resumed run's steps; returns what the summary reports."""
    with phases("setup"):
        run = recipe.setup_run(args, compute, inputs, was_ours)
        run.started = time.time()
    with phases("first step"):
        step = train_steps(recipe, run, run.start_step, 1)[0]
    with phases("steps"):
        step = train_steps(recipe, run, step, TIMED_STEPS)[0]
    times = sorted(run.step_times[1:])
    report = dict(step_time=times[len(times) // 2], peak_memory=peak_memory(compute.device_type),
                  start_step=run.start_step, batch_size=args.batch_size, flops_per_token=run.flops_per_token,
                  peak_flops=run.peak_flops, world_size=compute.world_size, device=compute.device,
                  device_type=compute.device_type, hellaswag_scored=args.hellaswag_limit)
    if compute.master:  # at once: a preflight cut short later (a timeout, a later phase failing) still has them
        print_speed(report, real, "the training steps")
    with phases("evaluation"):
        report["eval_time"] = evaluation_time(recipe, run, step, real)
    if args.core_every:
        with phases("CORE"):  # one pass, as the run makes them: --core_max_per_task items of each task
            report["core_time"] = timed(recipe.evaluate_core, run, step)
    with phases("disk"):
        report["file_bytes"] = checkpoint_bytes(run)
        report["saves"] = check_disk(real, run, report["file_bytes"])
    with phases("checkpoint"):
        run.checkpointer.save(step, run.val_loss, stop=True)  # a resume point: what a stop signal writes
        if compute.ddp:
            dist.barrier()  # written whole before any rank loads it
        saved = checkpoints.checkpoint_path(args.log_dir, "ckpt", step, run.checkpointer.sharded)
    report["save_time"] = phases.seconds["checkpoint"]
    with phases("ranks"):
        check_same_weights(run, compute)
        report["link"] = link_speed(run.raw_model, compute)
    with phases("resume"):
        live = train_steps(recipe, run, step, RESUME_STEPS)[1]
        del run  # the fresh model takes its place in memory
        check_resumed(recipe, args, compute, step, live, saved)
    return report


def train_steps(recipe, run, step, n):
    """n optimizer steps of the real loop's train_step, each checked and reported; returns (next step, losses)."""
    losses = []
    for _ in range(n):
        loss, lr, norm, dt, _, _ = recipe.train_step(run, step, [])
        norm = norm.item()
        recipe.check_finite(run, step, loss, norm)
        recipe.report_step(run, step, loss, lr, norm, dt)
        losses.append(loss)
        step += 1
    return step, losses


def evaluation_time(recipe, run, step, real):
    """One whole evaluation (it compiles HellaSwag's graph), then two quiet timed ones: with and without
    HellaSwag's few hundred examples. Returns the seconds one evaluation of the real run will take."""
    args = run.args
    recipe.evaluate(run, step)
    if not args.hellaswag:
        return timed(recipe.evaluate, run, step, sample=False)
    with_hellaswag = timed(recipe.evaluate, run, step, sample=False)
    without = timed(recipe.evaluate, run, step, sample=False, hellaswag=False)
    examples = real.hellaswag_limit or sum(1 for _ in recipe.hellaswag.iterate_examples("val"))
    return without + (with_hellaswag - without) * examples / args.hellaswag_limit


def timed(evaluate, run, step, **flags):
    """Seconds for evaluate(run, step) with these flags set for the call, its lines not printed."""
    saved = {k: getattr(run.args, k) for k in flags}
    vars(run.args).update(flags)
    log_file, run.log_file = run.log_file, None
    try:
        t0 = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            evaluate(run, step)
        synchronize(run.compute.device_type)
        return time.time() - t0
    finally:
        vars(run.args).update(saved)
        run.log_file = log_file


def checkpoint_bytes(run):
    """About what one checkpoint file takes: the weights and the optimizer's state (both optimizers' under
    Muon), tensor by tensor."""
    return tensor_bytes(run.raw_model.state_dict()) + tensor_bytes(run.optimizer.state_dict())


def tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return sum(tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def saves_ahead(run, real):
    """The files the whole run will write, from where it starts: (milestones, resume points)."""
    checkpointer = checkpoints.Checkpointer(real, run.raw_model, run.optimizer, {}, run.start_step, True,
                                            run.compute.world_size, {})
    names = [checkpointer.due(step, step == real.max_steps - 1) for step in range(run.start_step, real.max_steps)]
    return names.count("model"), names.count("ckpt")


def check_disk(real, run, file_bytes):
    """Room for what the run keeps in --log_dir (its milestones, --keep_last resume points and one being
    written, its log), and in the temporary folder for one checkpoint. Returns (milestones, resume points,
    bytes kept)."""
    if not run.compute.master:
        return None
    milestones, resume_points = saves_ahead(run, real)
    kept = (milestones + min(resume_points, real.keep_last + 1)) * file_bytes + LOG_LINE_BYTES * real.max_steps
    free = shutil.disk_usage(nearest_existing(real.log_dir)).free
    if free < kept:
        raise UserError(f"--log_dir {real.log_dir} has {gb(free)} free, and the run keeps about {gb(kept)} there "
                        f"(milestones {milestones}, resume points up to {min(resume_points, real.keep_last + 1)}, "
                        f"each {gb(file_bytes)}; and the log): free some space, raise --checkpoint_every, or pass "
                        "another --log_dir")
    free_temp = shutil.disk_usage(run.args.log_dir).free
    if free_temp < file_bytes:
        raise UserError(f"the temporary folder {run.args.log_dir} has {gb(free_temp)} free and a checkpoint takes "
                        f"{gb(file_bytes)}: set TMPDIR to a folder with room")
    return milestones, resume_points, kept


def check_resumed(recipe, args, compute, step, live, saved):
    """The steps from `step` again, from the checkpoint saved there (`saved`: under --fsdp a sharded folder)
    loaded into a fresh model and optimizer: their losses must equal `live`, the run's own (bit for bit on
    CPU), or a resumed run would not continue it."""
    gc.collect()
    if compute.device_type == "cuda":
        torch.cuda.empty_cache()
    args.resume = saved  # read by every rank
    inputs = recipe.check_inputs(args, compute)
    with contextlib.redirect_stdout(io.StringIO()):  # its description was printed once already
        resumed = recipe.setup_run(args, compute, inputs, was_ours=True)
    resumed.started = time.time()
    if compute.master:
        print(f"preflight: steps {step}-{step + RESUME_STEPS - 1} again, from the checkpoint in a fresh model:")
    again = train_steps(recipe, resumed, step, RESUME_STEPS)[1]
    tolerance = 0.0 if compute.device_type == "cpu" else GPU_LOSS_TOLERANCE
    if any(abs(a - b) > tolerance for a, b in zip(live, again)):
        raise UserError(f"from the checkpoint of step {step}, steps {step}-{step + RESUME_STEPS - 1} gave losses "
                        f"{again}, the run itself {live}: a resumed run would not continue this one")


def check_same_weights(run, compute):
    """DDP keeps one model on every rank: each parameter's sum is the same everywhere, to the bit. (Under
    --fsdp each rank holds its own shards: nothing to compare.)"""
    if not compute.ddp or run.checkpointer.sharded:
        return
    sums = torch.stack([p.detach().double().sum() for p in run.raw_model.parameters()])
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    differ = (low != high).nonzero().flatten().tolist()
    if differ:
        name = [n for n, _ in run.raw_model.named_parameters()][differ[0]]
        raise UserError(f"the ranks' weights differ ({len(differ)} parameters, first {name}): DDP did not keep "
                        "them in step")


def link_speed(model, compute, repeats=3):
    """Seconds for an all-reduce of a buffer the size of the gradients this rank holds (DDP's traffic per step;
    under --fsdp its shards: a model that needs sharding may have no room for a whole copy) and its bus
    bandwidth in bytes/s (nccl-tests' busbw: what each link carries); None with one process."""
    if not compute.ddp:
        return None
    buffer = torch.ones(sum(sharding.local(p).numel() for p in model.parameters()), device=compute.device)
    dist.all_reduce(buffer)  # the first one sets up the connections
    synchronize(compute.device_type)
    t0 = time.time()
    for _ in range(repeats):
        dist.all_reduce(buffer)
    synchronize(compute.device_type)
    seconds = (time.time() - t0) / repeats
    n = compute.world_size
    return dict(bytes=buffer.numel() * 4, seconds=seconds, bus=buffer.numel() * 4 * 2 * (n - 1) / n / seconds)


def peak_memory(device_type):
    """(peak, total) bytes: the GPU's allocations against its memory, or the process's peak resident memory
    against the machine's."""
    total = speed.device_memory_bytes("cuda" if device_type == "cuda" else "cpu")  # (MPS: the host's memory too)
    return speed.peak_memory_bytes(device_type), total


def gb(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def print_speed(r, real, what):
    """The speed, MFU and peak memory lines (what = the phases the peak covers)."""
    tokens_per_sec = real.total_batch_size / r["step_time"]
    mfu = "" if r["peak_flops"] is None else \
        f" | MFU {speed.mfu_percent(r['flops_per_token'], tokens_per_sec, r['peak_flops'], r['world_size']):.1f}%"
    print(f"preflight: speed {r['step_time'] * 1000:.1f} ms/step (median of {TIMED_STEPS}, -B {r['batch_size']}) | "
          f"{tokens_per_sec:,.0f} tok/s{mfu}", flush=True)
    peak, total = r["peak_memory"]
    print(f"preflight: peak memory {gb(peak)}" + (f" of {gb(total)} ({100 * peak / total:.0f}%)" if total else "")
          + (" on " + r["device"] + ", reserved" if r["device_type"] == "cuda" else " (this process)")
          + f", over {what}", flush=True)


def print_report(r, real, phases, duration):
    """What the run will take, from what the phases measured."""
    r["peak_memory"] = peak_memory(r["device_type"])  # now with the evaluation's and the resume's
    print_speed(r, real, "every phase")
    link = r["link"]
    print("preflight: link: one process, nothing to all-reduce" if link is None else
          f"preflight: link: all-reduce of {gb(link['bytes'])} (this rank's gradients) in "
          f"{link['seconds'] * 1000:.1f} ms, bus bandwidth {link['bus'] / 1e9:.2f} GB/s")
    steps = range(r["start_step"], real.max_steps)
    evals = sum(1 for s in steps if s % real.eval_every == 0 or s == real.max_steps - 1)
    milestones, resume_points, kept = r["saves"]
    cores = sum(1 for s in steps if real.core_every and s > 0 and (s % real.core_every == 0 or s == real.max_steps - 1))
    total_time = len(steps) * r["step_time"] + evals * r["eval_time"] + (milestones + resume_points) * r["save_time"] \
        + cores * r.get("core_time", 0.0)
    print(f"preflight: the run: about {duration(total_time)} for steps {r['start_step']}-{real.max_steps - 1} "
          f"({len(steps):,} x {r['step_time']:.3g}s + {evals} evaluations x {r['eval_time']:.3g}s + "
          + (f"{cores} CORE passes x {r['core_time']:.3g}s + " if real.core_every else "") +
          f"{milestones + resume_points} saves x {r['save_time']:.2g}s; HellaSwag's time scaled from "
          f"{r['hellaswag_scored']} examples)")
    print(f"preflight: disk: --log_dir {real.log_dir} will hold about {gb(kept)} (milestones {milestones}, resume "
          f"points up to {min(resume_points, real.keep_last + 1)}, each {gb(r['file_bytes'])}; and the log)")
    print(f"preflight passed: every phase ran, in {duration(sum(phases.seconds.values()))} in all")
