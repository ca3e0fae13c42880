"""
Exact resume: a run killed at any point (even mid-save) and restarted writes the same log.txt,
byte for byte on CPU in fp32, as one that was never interrupted. Real processes, real signals.
"""

import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MODEL, main_output, read_log, run

from machinery import checkpoints
import fineweb
import train_gpt2

pytestmark = pytest.mark.slow  # real training processes: left out of `pytest -m "not slow"`

STEPS = 16


@pytest.fixture(scope="module")
def small_shards(build_once, shakespeare_path, enc):
    """Tiny Shakespeare in 1,000-token shards: a step of 256 tokens crosses a shard end every 3-4 steps."""
    def make(root):
        fineweb.main(["--dataset", shakespeare_path, "--out_dir", str(root), "--shard_size", "1000", "--num_proc", "1"])
        return str(root)

    return build_once("small_shards", make)


def train_args(data_dir, log_dir, B=4, extra=()):
    return ["--data_dir", data_dir, "--log_dir", log_dir, *TINY_MODEL, "-B", B, "-T", 32,
            "--total_batch_size", 256, "--max_steps", STEPS, "--warmup_steps", 3, "--max_lr", 2e-3,
            "--eval_every", 5, "--val_steps", 2, "--hellaswag_limit", 6, "--no-sample",
            "--save_every", 3, "--checkpoint_every", 8, *extra]


def command(args, nproc=1):
    args = [str(a) for a in args]
    if nproc == 1:
        return [sys.executable, os.path.join(REPO, "train_gpt2.py"), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            os.path.join(REPO, "train_gpt2.py"), *args]


def start(args, nproc=1):
    """Start a run in the background; its output goes to proc.out_path."""
    out_path = os.path.join(os.path.dirname(str(args[args.index("--log_dir") + 1])), f"out_{time.monotonic_ns()}.txt")
    with open(out_path, "w") as out:
        proc = subprocess.Popen(command(args, nproc), stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    proc.out_path = out_path
    return proc


def wait_until(proc, condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the point to kill it"
        assert time.time() < deadline, "timed out"
        time.sleep(0.002)


def logged(log_dir, prefix):
    """True once log.txt has a line starting with `prefix` (e.g. "7 train")."""
    path = os.path.join(log_dir, "log.txt")
    return lambda: os.path.exists(path) and any(line.startswith(prefix + " ") for line in open(path))


def descendants(pid):
    """All processes below pid. torchrun starts each rank in a session of its own, out of its process group."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in glob.glob(f"/proc/{parent}/task/*/children"):
            with open(task) as f:
                kids = [int(k) for k in f.read().split()]
            found += kids
            todo += kids
    return found


def kill9(proc):
    """SIGKILL the run and every process under it at once, as when the machine is lost."""
    pids = [proc.pid] + descendants(proc.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in pids:  # reaped or gone: none may go on writing into the log dir
        deadline = time.time() + 10
        while os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z":
            assert time.time() < deadline, f"process {pid} survived SIGKILL"
            time.sleep(0.01)


def finish(args, nproc=1):
    """Run to the end; its stdout. One process runs in this one (train_gpt2.main, the code path a fresh process
    runs, without its start-up); more run under torchrun."""
    if nproc == 1:
        return main_output(train_gpt2.main, *args)
    proc = run(command(args, nproc))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def log_bytes(log_dir):
    with open(os.path.join(log_dir, "log.txt"), "rb") as f:
        return f.read()


class References(dict):
    """references[nproc] -> the log dir of an uninterrupted run of train_args at 1 or 2 processes, made once in
    the test run when first asked for. Read them; copy one to change it."""

    def __init__(self, shards, build_once):
        super().__init__()
        self.shards, self.build_once = shards, build_once

    def __missing__(self, nproc):
        def make(root):
            finish(train_args(self.shards, root / "log"), nproc)
            return str(root / "log")

        self[nproc] = self.build_once(f"resume_reference{nproc}", make)
        return self[nproc]


@pytest.fixture(scope="module")
def reference(small_shards, build_once, hellaswag_dir):
    return References(small_shards, build_once)


def test_kill9_anywhere_then_resume_is_byte_identical(reference, small_shards, tmp_path):
    rng = random.Random()
    log_dir = str(tmp_path / "log")
    args = train_args(small_shards, log_dir)
    k1 = rng.randint(1, 4)
    k2 = rng.randint(k1 + 5, STEPS - 3)
    points = f"kill -9 after step {k1}, mid-save, after step {k2}"

    proc = start(args)
    wait_until(proc, logged(log_dir, f"{k1} train"))
    kill9(proc)

    proc = start(args)  # killed while a checkpoint is being written
    wait_until(proc, lambda: glob.glob(os.path.join(log_dir, "*.pt.tmp")))
    kill9(proc)
    assert glob.glob(os.path.join(log_dir, "*.pt.tmp")), "the kill was meant to land mid-save"

    proc = start(args)
    wait_until(proc, logged(log_dir, f"{k2} train"))
    kill9(proc)

    stdout = finish(args)
    assert "resuming at step" in stdout
    assert log_bytes(log_dir) == log_bytes(reference[1]), points
    assert not glob.glob(os.path.join(log_dir, "*.tmp"))


def test_shuffled_run_resumes_byte_identical(reference, small_shards, tmp_path):
    args = train_args(small_shards, tmp_path / "ref", extra=["--shuffle"])
    finish(args)
    assert log_bytes(tmp_path / "ref") != log_bytes(reference[1])  # the shuffle changed the stream
    log_dir = str(tmp_path / "log")
    args = train_args(small_shards, log_dir, extra=["--shuffle"])
    proc = start(args)
    wait_until(proc, logged(log_dir, f"{random.Random().randint(4, STEPS - 3)} train"))
    kill9(proc)
    finish(args)
    assert log_bytes(log_dir) == log_bytes(tmp_path / "ref")


def test_kill9_two_processes_then_resume_is_byte_identical(reference, small_shards, tmp_path):
    log_dir = str(tmp_path / "log")
    args = train_args(small_shards, log_dir)
    k = random.Random().randint(4, STEPS - 3)
    proc = start(args, nproc=2)
    wait_until(proc, logged(log_dir, f"{k} train"))
    kill9(proc)  # torchrun and both ranks at once
    stdout = finish(args, nproc=2)
    assert "resuming at step" in stdout
    assert log_bytes(log_dir) == log_bytes(reference[2]), f"killed after step {k}"


def test_sigterm_stops_both_ranks_at_one_step_saves_and_resumes(reference, small_shards, tmp_path):
    log_dir = str(tmp_path / "log")
    args = train_args(small_shards, log_dir)
    proc = start(args, nproc=2)
    wait_until(proc, logged(log_dir, "6 train"))
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it to the ranks
    proc.wait(timeout=60)
    out = open(proc.out_path).read()
    stops = sorted(line.split(" on ")[0] for line in out.splitlines() if ": stopped at step " in line)
    assert len(stops) == 2, out[-3000:]
    step = int(stops[0].rsplit(" ", 1)[1])
    assert stops == [f"rank 0: stopped at step {step}", f"rank 1: stopped at step {step}"]
    assert step in (7, 8)  # within one step of the signal
    assert os.path.exists(os.path.join(log_dir, f"ckpt_{step:05d}.pt"))
    assert proc.returncode != 0  # so that a restart loop runs it again
    finish(args, nproc=2)
    assert log_bytes(log_dir) == log_bytes(reference[2])


def test_new_world_size_and_micro_batch_continue_the_token_stream(reference, small_shards, tmp_path):
    """1 process x B=4 stopped by Ctrl-C, resumed as 2 processes x B=2: the same 128-token chunks, the same steps."""
    log_dir = str(tmp_path / "log")
    proc = start(train_args(small_shards, log_dir))
    wait_until(proc, logged(log_dir, "9 train"))
    proc.send_signal(signal.SIGINT)  # Ctrl-C: the same clean stop as SIGTERM
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    assert "rank 0: stopped at step" in open(proc.out_path).read()
    stdout = finish(train_args(small_shards, log_dir, B=2), nproc=2)
    assert "note: -B 4 x 1 processes -> -B 2 x 2 processes" in stdout
    got, want = read_log(os.path.join(log_dir, "log.txt")), read_log(os.path.join(reference[1], "log.txt"))
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}
    for kind in want:
        for step, value in want[kind].items():
            assert got[kind][step] == pytest.approx(value, abs=2e-5), (kind, step)


def run_main(*argv):
    with pytest.raises(SystemExit) as e:
        train_gpt2.main([str(a) for a in argv])
    return e.value.code


def test_mismatches_and_bad_checkpoints_are_clear(reference, small_shards, tmp_path, capsys):
    log_dir = str(tmp_path / "log")
    shutil.copytree(reference[1], log_dir)
    args = train_args(small_shards, log_dir)
    assert "the checkpoint is of another model: n_layer 2 (this run: 3)" in run_main(*args, "--n_layer", 3)
    msg = run_main(*args, "-T", 16)
    assert "trained with --seq_len 32, this run has 16" in msg and "pass --seq_len 32" in msg
    assert "trained with --total_batch_size 256, this run has 512" in run_main(*args, "--total_batch_size", 512)
    assert "trained with --shuffle False, this run has True" in run_main(*args, "--shuffle")

    (tmp_path / "junk.pt").write_bytes(b"\x80\x02not a checkpoint")
    assert "junk.pt is not a readable train_gpt2.py checkpoint" in run_main(*args, "--resume", tmp_path / "junk.pt")
    weights = tmp_path / "weights.pt"
    ckpt = torch.load(os.path.join(log_dir, "model_00008.pt"), weights_only=True)
    torch.save({k: ckpt[k] for k in ("model", "config", "step")}, weights)
    assert "holds weights only" in run_main(*args, "--resume", weights)
    assert log_bytes(log_dir) == log_bytes(reference[1])  # none of that touched the run

    # a truncated newest checkpoint: auto falls back to the one before and still ends identical (the run
    # was killed during its last step, so it is not finished: its log stops before step 15's train line)
    with open(os.path.join(log_dir, "log.txt")) as f:
        lines = [line for line in f if not line.startswith("15 ")]
    with open(os.path.join(log_dir, "log.txt"), "w") as f:
        f.writelines(lines)
    newest = sorted(glob.glob(os.path.join(log_dir, "*.pt")), key=lambda p: p[-8:])[-1]
    assert newest.endswith("model_00015.pt")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    capsys.readouterr()
    assert run_main(*args) == 0
    out = capsys.readouterr().out
    assert "warning: skipping" in out and "model_00015.pt is not a readable" in out
    assert "resuming at step 15 from" not in out and "resuming at step 12 from" in out
    assert log_bytes(log_dir) == log_bytes(reference[1])


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(reference, small_shards, tmp_path):
    log_dir = str(tmp_path / "log")
    args = train_args(small_shards, log_dir)
    proc = start(args)
    wait_until(proc, lambda: os.path.exists(os.path.join(log_dir, "ckpt_00003.pt")))
    # the next save writes ckpt_00006.pt.tmp: make that name the kernel's always-full device
    os.symlink("/dev/full", os.path.join(log_dir, "ckpt_00006.pt.tmp"))
    proc.wait(timeout=120)
    out = open(proc.out_path).read()
    assert proc.returncode == 1, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("train_gpt2.py: error: could not write checkpoint") and "ckpt_00006.pt" in last
    assert "No space left on device" in last and "rerun the same command to resume" in last
    assert not os.path.lexists(os.path.join(log_dir, "ckpt_00006.pt.tmp"))
    assert torch.load(os.path.join(log_dir, "ckpt_00003.pt"), weights_only=True)["step"] == 3
    finish(args)
    assert log_bytes(log_dir) == log_bytes(reference[1])


def test_checkpoint_contents_rotation_and_timed_saves(small_shards, tmp_path, hellaswag_dir):
    log_dir = str(tmp_path / "log")
    finish(train_args(small_shards, log_dir, extra=["--save_every", 2, "--keep_last", 2,
                                                    "--save_every_minutes", 1e-6]))
    names = sorted(os.listdir(log_dir))
    # every step saved (timed), the older resume points rotated away, milestones 8 and 15 kept
    assert names == ["ckpt_00013.pt", "ckpt_00014.pt", "log.txt", "model_00008.pt", "model_00015.pt", "train_gpt2.lock"]
    ckpt = torch.load(os.path.join(log_dir, "ckpt_00014.pt"), weights_only=True)
    assert {"model", "optimizer", "config", "step", "val_loss", "args", "world_size", "data", "rng"} <= set(ckpt)
    assert ckpt["step"] == 14 and ckpt["world_size"] == 1 and ckpt["args"]["batch_size"] == 4
    assert set(ckpt["data"]["train"]) == {"epoch", "order_index", "shard", "position", "shard_name", "shuffle", "seed"}
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["model"]) - 1  # lm_head is wte

    # a leftover from a later point (an abandoned future) does not push out the checkpoints being made
    open(os.path.join(log_dir, "ckpt_00099.pt"), "wb").close()
    checkpoints.rotate_checkpoints(log_dir, 1, 14)
    assert sorted(n for n in os.listdir(log_dir) if n.startswith("ckpt_")) == ["ckpt_00014.pt", "ckpt_00099.pt"]


# -----------------------------------------------------------------------------
# What a run owns, and the faults it survives without losing anything


def test_a_second_run_in_the_same_folder_refuses(reference, small_shards, tmp_path):
    log_dir = str(tmp_path / "log")
    args = train_args(small_shards, log_dir)
    first = start(args)
    wait_until(first, logged(log_dir, "1 train"))
    # held still while the second starts: a tiny run could otherwise finish first (CI saw the second find it
    # complete, exit 0); a stopped process keeps its lock
    first.send_signal(signal.SIGSTOP)
    try:
        second = run(command(args))
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode != 0 and "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert f"{log_dir} is in use by pid {first.pid} on " in last and "--log_dir" in last
    assert first.wait(timeout=300) == 0
    assert log_bytes(log_dir) == log_bytes(reference[1])  # the first run never noticed


def test_kill9_of_the_launcher_alone_then_an_immediate_rerun(reference, small_shards, tmp_path):
    """torchrun's ranks live in sessions of their own: killing only the launcher used to leave them training
    (and racing a rerun). They now exit with it, so the rerun finds the folder free and resumes exactly."""
    log_dir = str(tmp_path / "log")
    args = train_args(small_shards, log_dir)
    proc = start(args, nproc=2)
    wait_until(proc, logged(log_dir, f"{random.Random().randint(4, STEPS - 3)} train"))
    ranks = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stdout = finish(args, nproc=2)
    assert "resuming at step" in stdout
    assert log_bytes(log_dir) == log_bytes(reference[2])
    assert not [pid for pid in ranks if os.path.exists(f"/proc/{pid}")
                and open(f"/proc/{pid}/stat").read().split()[2] != "Z"]


def test_only_the_runs_own_files_are_touched(reference, small_shards, tmp_path, capsys):
    args = lambda log_dir, *extra: [*train_args(small_shards, log_dir), *extra]  # noqa: E731
    # a folder of the user's: their log.txt is refused, their other files are never deleted
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.txt").write_text("my notes\n")
    (mine / "draft.tmp").write_text("half a thought")
    (mine / "ckpt_00004.tmp").write_text("a file, not a sharded save's folder")
    assert "log.txt was not written by train_gpt2.py" in run_main(*args(mine))
    (mine / "log.txt").unlink()
    finish(args(mine))
    assert (mine / "draft.tmp").read_text() == "half a thought"
    assert (mine / "ckpt_00004.tmp").read_text() == "a file, not a sharded save's folder"
    assert log_bytes(mine) == log_bytes(reference[1])

    # a finished run is left as it is: rerun, rerun with fewer steps, or another run's checkpoint into it
    done = str(tmp_path / "done")
    shutil.copytree(reference[1], done)
    contents = lambda: {name: open(os.path.join(done, name), "rb").read() for name in os.listdir(done)  # noqa: E731
                        if name != "train_gpt2.lock"}  # the lock file names its latest holder
    before = contents()
    capsys.readouterr()
    assert run_main(*args(done)) == 0
    assert "holds a complete run (its log reaches step 15, --max_steps is 16); nothing to do" in capsys.readouterr().out
    assert run_main(*args(done, "--max_steps", 10)) == 0
    other = os.path.join(str(mine), "ckpt_00012.pt")
    msg = run_main(*args(done, "--resume", other))
    assert "already holds a run" in msg and "resume it into a new --log_dir" in msg
    assert contents() == before


def test_a_torn_log_line_is_dropped_on_resume(reference, small_shards, tmp_path):
    """A crash or a full disk mid-append leaves a line without its newline; the resume must not continue it
    (it once made `1150 train ...` out of a torn "1" and step 150's line)."""
    log_dir = str(tmp_path / "log")
    args = train_args(small_shards, log_dir)
    proc = start(args)
    wait_until(proc, logged(log_dir, "10 train"))
    kill9(proc)
    with open(os.path.join(log_dir, "log.txt"), "a") as f:
        f.write("1")
    finish(args)
    assert log_bytes(log_dir) == log_bytes(reference[1])


def test_a_full_disk_stops_with_one_line_and_leaves_nothing_half_written(small_shards, small_disk, tmp_path,
                                                                          hellaswag_dir):
    # a checkpoint that does not fit: torch's zip writer fails with a RuntimeError, reported as one line
    log_dir = small_disk("2m")
    proc = run(command(train_args(small_shards, log_dir)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "could not write checkpoint" in last and "ckpt_00003.pt" in last and "bytes free there" in last
    assert sorted(os.listdir(log_dir)) == ["log.txt", "train_gpt2.lock"]
    assert read_log(os.path.join(log_dir, "log.txt"))["train"].keys() == {0, 1, 2}

    # a log line that does not fit: one line, and the resume after it continues cleanly
    log_dir = small_disk("1m")
    with open(log_dir / "filler", "wb") as f:  # one 4 KiB page left: the lock's; log.txt's first line has none
        f.write(b"x" * (2 ** 20 - 4096))
    proc = run(command(train_args(small_shards, log_dir)))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "could not append to" in proc.stderr.strip().splitlines()[-1]

    # an export that does not fit: no folder left behind, and a retry elsewhere works
    ckpt = tmp_path / "model.pt"
    model = train_gpt2.GPT(train_gpt2.GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=64))
    checkpoints.atomic_torch_save({"model": model.state_dict(), "config": vars(model.config), "step": 1}, str(ckpt))
    out_disk = small_disk("1m")
    import export

    with pytest.raises(SystemExit) as e:
        export.main([str(ckpt), str(out_disk / "exported")])
    assert str(e.value).startswith("export.py: error: could not write") and os.listdir(out_disk) == []
    export.main([str(ckpt), str(tmp_path / "exported")])  # the retry, where there is room
    assert "model.safetensors" in os.listdir(tmp_path / "exported")


def test_a_diverging_run_stops_at_the_first_non_finite_step(small_shards, tmp_path, hellaswag_dir):
    log_dir = tmp_path / "log"
    args = train_args(small_shards, log_dir, extra=["--max_lr", 1e12, "--save_every", 1])
    proc = run(command(args))
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]  # 3: diverged
    last = proc.stderr.strip().splitlines()[-1]
    assert "the run diverged at step" in last and "--max_lr (now 1000000000000.0)" in last
    step = int(last.split("at step ")[1].split()[0])
    # the same command again (a restart loop, torchrun --max-restarts) stops at once, before any step
    again = run(command(args))
    assert again.returncode == 3 and "Traceback" not in again.stderr and "step " not in again.stdout
    assert f"the run diverged at step {step}" in again.stderr and "is not resumed with the same command" in again.stderr
    assert os.path.exists(log_dir / "diverged.txt")
    log = read_log(log_dir / "log.txt")
    assert max(log["train"]) == step - 1 and all(v == v for v in log["train"].values())  # no NaN logged
    saved = glob.glob(str(log_dir / "*.pt"))
    assert saved  # the resume points before the divergence are kept, and every one of them is finite
    for path in saved:
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["step"] <= step and all(torch.isfinite(t).all() for t in ckpt["model"].values()), path


def test_resuming_onto_changed_data_or_a_damaged_checkpoint(reference, small_shards, tmp_path, capsys):
    data, log_dir = str(tmp_path / "shards"), str(tmp_path / "log")
    shutil.copytree(small_shards, data)
    args = train_args(data, log_dir)
    proc = start(args)
    wait_until(proc, lambda: os.path.exists(os.path.join(log_dir, "ckpt_00009.pt")))
    kill9(proc)

    # a damaged newest checkpoint, whatever the damage, is skipped for the one before
    newest = os.path.join(log_dir, "ckpt_00009.pt")
    good = open(newest, "rb").read()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01  # one bit, inside the weights
    for damage in (bytes(flipped), b"this is not a checkpoint\n"):
        with open(newest, "wb") as f:
            f.write(damage)
        with pytest.raises(checkpoints.UserError, match="ckpt_00009.pt is (corrupt|not a readable)"):
            checkpoints.load_checkpoint(newest)
    # a shard replaced by other tokens of the same size and name: refused, unless --new_data says so
    shard = sorted(glob.glob(os.path.join(data, "*_train_*.npy")))[1]
    np.save(shard, np.load(shard)[::-1])
    msg = run_main(*args)
    assert "the checkpoint was trained on other data: its train shards differ" in msg and "--new_data" in msg
    assert "warning: skipping" in capsys.readouterr().out  # the text-overwritten ckpt_00009.pt on the way
    other = str(tmp_path / "other")
    shutil.copytree(log_dir, other)
    assert "note: --new_data: its train shards differ" in finish(train_args(data, other, extra=["--new_data"]))

    shutil.copy(os.path.join(small_shards, os.path.basename(shard)), shard)  # the data as it was
    finish(args)
    assert log_bytes(log_dir) == log_bytes(reference[1])  # resumed from ckpt_00006.pt, exactly


def test_an_error_on_rank_0_alone_ends_every_rank_within_seconds(small_shards, small_disk, tmp_path, hellaswag_dir):
    from machinery.common import lock_folder

    # before the process group: rank 0 finds the folder taken (here, by this test); rank 1 was waiting for it
    log_dir = tmp_path / "taken"
    log_dir.mkdir()
    fd = lock_folder(str(log_dir), "train_gpt2.lock", "--log_dir")
    started = time.time()
    proc = run(command(train_args(small_shards, log_dir), nproc=2))
    os.close(fd)
    assert proc.returncode != 0 and time.time() - started < 25, proc.stderr[-2000:]
    assert f"train_gpt2.py: error: {log_dir} is in use by pid {os.getpid()}" in proc.stderr

    # after it: rank 0's log append finds the disk full while rank 1 waits in a collective
    log_dir = small_disk("1m")
    with open(log_dir / "filler", "wb") as f:
        f.write(b"x" * (2 ** 20 - 4096))
    started = time.time()
    proc = run(command(train_args(small_shards, log_dir), nproc=2))
    assert proc.returncode != 0 and time.time() - started < 25, proc.stderr[-2000:]
    assert "rank 1: stopping, another rank failed: could not append to" in proc.stderr


def test_an_unusable_log_dir_is_one_line(small_shards, tmp_path, hellaswag_dir):
    (tmp_path / "a_file").write_text("not a folder")
    assert "cannot use --log_dir" in run_main(*train_args(small_shards, tmp_path / "a_file"))
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    subprocess.run(["mount", "--bind", "-o", "ro", str(read_only), str(read_only)], capture_output=True)
    if os.access(read_only, os.W_OK) and not os.path.ismount(read_only):
        pytest.skip("cannot make a read-only folder here (a read-only bind mount needs root)")
    try:
        msg = run_main(*train_args(small_shards, read_only / "log"))
        assert "cannot use --log_dir" in msg and "Read-only" in msg
    finally:
        subprocess.run(["umount", "-l", str(read_only)], capture_output=True)


def test_another_runs_checkpoint_continues_in_a_new_folder(reference, small_shards, tmp_path):
    """--resume OTHER/ckpt_N.pt --log_dir NEW: the run goes on from step N in NEW, whose log starts there,
    and the other run's folder is left as it was."""
    source = reference[1]
    before = {name: os.path.getmtime(os.path.join(source, name)) for name in os.listdir(source)}
    new_dir = str(tmp_path / "continued")
    stdout = finish(train_args(small_shards, new_dir, extra=["--resume", os.path.join(source, "ckpt_00012.pt")]))
    assert "resuming at step 12" in stdout
    want = b"".join(line for line in open(os.path.join(source, "log.txt"), "rb") if int(line.split()[0]) >= 12)
    assert log_bytes(new_dir) == want
    assert {name: os.path.getmtime(os.path.join(source, name)) for name in os.listdir(source)} == before


def test_a_second_ctrl_c_during_the_save_stops_at_once_and_says_so(reference, small_shards, tmp_path):
    log_dir = str(tmp_path / "log")
    args = train_args(small_shards, log_dir, extra=["--save_every", 100])  # the stop's save is the only one
    proc = start(args)
    wait_until(proc, logged(log_dir, "4 train"))
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while proc.poll() is None and not glob.glob(os.path.join(log_dir, "ckpt_*.pt.tmp")) and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)  # while the stop's checkpoint is being written (or just after)
    assert proc.wait(timeout=60) == 128 + signal.SIGINT
    out = open(proc.out_path).read()
    assert "before training began" not in out
    assert "stopped at once by a second Ctrl-C" in out or "rank 0: stopped at step" in out, out[-2000:]
    assert not glob.glob(os.path.join(log_dir, "*.tmp"))
    finish(args)
    assert log_bytes(log_dir) == log_bytes(reference[1])


def test_a_run_killed_before_its_first_checkpoint_says_it_starts_over(reference, small_shards, tmp_path):
    log_dir = str(tmp_path / "log")
    proc = start(train_args(small_shards, log_dir))
    wait_until(proc, logged(log_dir, "1 train"))  # the first resume point is at step 3
    kill9(proc)
    assert not glob.glob(os.path.join(log_dir, "*.pt"))
    stdout = finish(train_args(small_shards, log_dir))
    assert f"no checkpoint in {log_dir} yet: starting at step 0" in stdout
    assert log_bytes(log_dir) == log_bytes(reference[1])


def test_raising_max_steps_on_a_finished_run_says_the_schedule_is_recomputed(reference, small_shards, tmp_path):
    log_dir = str(tmp_path / "log")
    shutil.copytree(reference[1], log_dir)
    stdout = finish(train_args(small_shards, log_dir, extra=["--max_steps", STEPS + 2]))  # the later flag wins
    assert f"note: --max_steps changed from {STEPS} to {STEPS + 2}" in stdout
    assert (f"note: the learning-rate schedule is recomputed over {STEPS + 2} steps, so from step 15 on it follows "
            f"the new curve") in stdout and f"pass --max_steps {STEPS}" in stdout


def test_truncate_log_keeps_only_whole_lines_whatever_a_torn_one_holds(tmp_path):
    """A full disk or a crash can end log.txt anywhere: mid-line at a 4 KiB page boundary, or in zeros the
    file system left in a page that was never written. Only whole lines of steps before the resume step stay."""
    lines = [f"{step} train {10 - step / 100:.6f}\n" for step in range(300)] + ["250 val 7.5000\n"]
    whole = "".join(lines)
    cut = 4096 + 7  # a page boundary falls inside this line: keep its start, as a short write would
    line_start = whole.rfind("\n", 0, cut) + 1
    assert whole[line_start].isdigit() and not whole[line_start:cut].endswith("\n")
    tails = {"page boundary": whole[line_start:cut], "one digit": "1", "zeros": "\0" * 300,
             "zeros then a newline": "299 train 7.01\0\0\0\0\n", "number cut short": "299 train 7.\n",
             "a digit after zeros": "\0\0" + "299 train 7.010000\n"}
    for what, tail in tails.items():
        path = tmp_path / "log.txt"
        path.write_text(whole[:line_start] + tail, encoding="latin-1")
        step = int(whole[:line_start].splitlines()[-1].split()[0]) + 1
        checkpoints.truncate_log(str(path), step)
        assert path.read_text() == whole[:line_start], what
        checkpoints.truncate_log(str(path), 100)
        assert path.read_text() == "".join(lines[:100]), what
