"""
--preflight: every phase of the real run once, in a temporary folder, then the run's projections. Real
processes: it passes on a tiny config (1 process, 2 gloo ranks, and resuming a real run), leaves --log_dir and
TMPDIR as it found them, and a phase that cannot work fails in one line that names it, with exit 1.
"""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY_MODEL, assert_one_line_error, main_error, run, write_shards

import train_gpt2
from machinery import speed
from machinery.preflight import Phases
from machinery.common import UserError

pytestmark = pytest.mark.slow  # real training processes

PHASES = ["inputs", "setup", "first step", "steps", "evaluation", "disk", "checkpoint", "ranks", "resume"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("preflight") / "shards")
    write_shards(root, [4000], split="val", first_index=0)
    write_shards(root, [6000, 6000])
    return root


def command(shards, log_dir, *extra, nproc=1):
    flags = ["--data_dir", shards, "--log_dir", log_dir, *TINY_MODEL, "-B", 4, "-T", 32, "--total_batch_size",
             256 * nproc, "--max_steps", 40, "--warmup_steps", 3, "--eval_every", 10, "--val_steps", 2,
             "--hellaswag_limit", 8, "--save_every", 3, *extra]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    return launcher + [os.path.join(REPO, "train_gpt2.py"), *map(str, flags)]


def snapshot(folder):
    """{name: bytes} of everything in a folder, or None when there is no folder."""
    if not os.path.isdir(folder):
        return None
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def preflight(shards, log_dir, tmp, *extra, nproc=1):
    os.makedirs(tmp, exist_ok=True)
    return run(command(shards, log_dir, "--preflight", *extra, nproc=nproc), env={"TMPDIR": str(tmp)})


def leftovers(tmp):
    """What the preflight left in TMPDIR (torch's own caches, such as torchinductor_USER, may stay)."""
    return [name for name in os.listdir(tmp) if name.startswith("train_gpt2-preflight-")]


def assert_passed(proc):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for phase in PHASES:
        assert f"preflight: {phase} ok (" in proc.stdout, phase
    assert "preflight passed: every phase ran" in proc.stdout


def test_a_tiny_run_passes_every_phase_and_writes_nowhere(shards, hellaswag_dir, tmp_path):
    log_dir, tmp = tmp_path / "log", tmp_path / "tmp"
    proc = preflight(shards, log_dir, tmp)
    assert_passed(proc)
    assert not os.path.exists(log_dir) and leftovers(tmp) == []  # nothing made, nothing left behind
    out = proc.stdout
    assert "validation loss:" in out and "HellaSwag accuracy: " in out and "sample 0: " in out
    assert "preflight: steps 4-5 again, from the checkpoint in a fresh model:" in out
    # the same two steps from the checkpoint gave the run's own losses, to the bit (CPU, fp32)
    lines = [line.split("| dt")[0] for line in out.splitlines() if line.startswith("step ")]
    assert lines[4:6] == lines[6:8] and len(lines) == 8
    assert " tok/s | MFU " in out and "preflight: link: one process" in out
    assert "preflight: the run: about " in out and "for steps 0-39 (40 x " in out and " 5 evaluations x " in out
    assert "will hold about " in out and "(milestones 1, resume points up to 3, each " in out


def test_resuming_a_real_run_leaves_its_folder_byte_for_byte(shards, hellaswag_dir, tmp_path):
    log_dir, tmp = tmp_path / "log", tmp_path / "tmp"
    proc = run(command(shards, log_dir, "--max_steps", 7))
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = snapshot(log_dir)
    assert "ckpt_00003.pt" in before and "model_00006.pt" in before
    proc = preflight(shards, log_dir, tmp, "--max_steps", 12)  # the same run, to be trained on
    assert_passed(proc)
    assert "resuming at step 6 from " in proc.stdout and "for steps 6-11 (6 x " in proc.stdout
    assert snapshot(log_dir) == before and leftovers(tmp) == []
    # the finished run itself: the preflight says so and exits 0, as the run does (it trained on past the last
    # step, with negative ETAs)
    proc = preflight(shards, log_dir, tmp, "--max_steps", 7)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (f"preflight: nothing to check: {log_dir} holds a complete run (its "
                                                    "log reaches step 6, --max_steps is 7); nothing to do. Pass a "
                                                    "larger --max_steps to train on")
    assert len(proc.stdout.splitlines()) == 2 and proc.stdout.startswith("preflight: inputs ok")
    assert snapshot(log_dir) == before and leftovers(tmp) == []


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_ranks_pass_and_measure_the_link(shards, hellaswag_dir, core_bundle, tmp_path, mode):
    """Under torchrun, and with the speedrun-simple recipe's two optimizers and --val_tokens; under --fsdp
    (and --recompute) the resume phase saves and loads a sharded checkpoint. With --core_every, one CORE pass
    (the ranks scoring different numbers of rows: under --fsdp too) and its cost in the projection."""
    log_dir, tmp = tmp_path / "log", tmp_path / "tmp"
    fsdp = ["--fsdp", "--recompute"] if mode == "fsdp" else []
    proc = preflight(shards, log_dir, tmp, "--recipe", "speedrun-simple", "--val_tokens", 2048, *fsdp,
                     "--core_every", 20, "--core_max_per_task", 5, "--core_bundle", core_bundle, nproc=2)
    assert_passed(proc)
    assert "preflight: CORE ok (" in proc.stdout and " 2 CORE passes x " in proc.stdout
    saved = next(line for line in proc.stdout.splitlines() if line.startswith("saved "))
    assert saved.endswith("ckpt_00004") if fsdp else saved.endswith("ckpt_00004.pt")
    assert "processes 2" + (" (FSDP: sharded) | recompute" if fsdp else " |") in proc.stdout
    assert "preflight: link: all-reduce of " in proc.stdout
    assert "recipe speedrun-simple" in proc.stdout and "val loss over the first 2,048 val tokens" in proc.stdout
    assert " GB/s" in proc.stdout.split("preflight: link:")[1].splitlines()[0]
    # the gradients this rank holds: the whole model's under DDP, its half under FSDP (no room for a whole copy)
    n = int(re.search(r"model: ([\d,]+) parameters", proc.stdout).group(1).replace(",", ""))
    mb = float(re.search(r"link: all-reduce of ([\d.]+) MB \(this rank's gradients\)", proc.stdout).group(1))
    assert mb == pytest.approx(4 * n / 1e6 / (2 if fsdp else 1), rel=0.02)
    assert not os.path.exists(log_dir) and leftovers(tmp) == []


def test_a_rank_killed_mid_preflight_leaves_the_others_a_line_naming_the_phase(shards, tmp_path):
    """Rank 1 killed (SIGKILL) once the timed steps have passed: rank 0, stopped by torchrun or by the broken
    connection, says at which phase and that another rank died (it printed gloo's traceback, or nothing)."""
    from test_multinode import worker_of_rank
    from test_resume import wait_until

    os.makedirs(tmp_path / "tmp")
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        launcher = subprocess.Popen(command(shards, tmp_path / "log", "--preflight", "--no-hellaswag", nproc=2),
                                    stdout=out, stderr=subprocess.STDOUT, text=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1", TMPDIR=str(tmp_path / "tmp")))
    wait_until(launcher, lambda: "preflight: steps ok" in out_path.read_text(), timeout=240)
    os.kill(worker_of_rank(launcher, 1), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    text = out_path.read_text()
    # in a phase ("at evaluation") or between two ("after steps"), as the signal falls
    assert re.search(r"train_gpt2.py: error: preflight failed (at|after) [a-z ]+: (another rank died|stopped by "
                     r"SIGTERM: torchrun stops every rank when one fails)", text), text[-3000:]
    assert 'preflight.py", line' not in text and 'train_gpt2.py", line' not in text, text[-3000:]


def test_no_hellaswag_file_fails_at_inputs(shards, tmp_path):
    offline = {"HELLASWAG_CACHE_DIR": str(tmp_path / "hs"), "HTTPS_PROXY": "http://127.0.0.1:9",
               "TMPDIR": str(tmp_path)}
    proc = run(command(shards, tmp_path / "log", "--preflight"), env=offline)
    assert proc.returncode == 1
    assert_one_line_error(proc, "preflight failed at inputs:", "hellaswag_val.jsonl", "--no-hellaswag")
    assert not os.path.exists(tmp_path / "log")


def test_a_full_log_disk_fails_at_disk(shards, hellaswag_dir, small_disk, tmp_path):
    disk, tmp = small_disk("2m"), tmp_path / "tmp"
    proc = preflight(shards, disk / "log", tmp)
    assert proc.returncode == 1
    assert_one_line_error(proc, "preflight failed at disk:", f"--log_dir {disk / 'log'} has ", "free some space")
    assert os.listdir(disk) == [] and leftovers(tmp) == []


def test_a_small_tmpfs_for_the_temporary_folder_fails_at_disk(shards, hellaswag_dir, small_disk, tmp_path):
    tmp = small_disk("2m")
    proc = preflight(shards, tmp_path / "log", tmp)
    assert proc.returncode == 1
    assert_one_line_error(proc, "preflight failed at disk:", "the temporary folder", "set TMPDIR")
    assert leftovers(tmp) == [] and not os.path.exists(tmp_path / "log")


def test_a_log_dir_that_is_a_file_or_holds_another_run_fails_at_inputs(shards, hellaswag_dir, tmp_path):
    (tmp_path / "file").write_text("mine")
    proc = preflight(shards, tmp_path / "file" / "log", tmp_path / "tmp")
    assert_one_line_error(proc, "preflight failed at inputs:", "is a file, not a folder")
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "log.txt").write_text("my notes\n")
    proc = preflight(shards, tmp_path / "other", tmp_path / "tmp")
    assert proc.returncode == 1
    assert_one_line_error(proc, "preflight failed at inputs:", "was not written by train_gpt2.py")
    assert (tmp_path / "other" / "log.txt").read_text() == "my notes\n"
    assert leftovers(tmp_path / "tmp") == []


def test_out_of_memory_in_a_phase_is_one_line_naming_a_smaller_batch():
    """The default -B 64 does not fit a 40 GB card: the preflight says so at its first step, as the run would,
    also when torch.compile wraps the error (its backend ran out while compiling)."""
    args = train_gpt2.parse_args([])
    phases = Phases(True, lambda e: train_gpt2.out_of_memory_error(args, e))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB")
    for error in (oom, RuntimeError("backend compiler failed")):
        error.__cause__ = oom if error is not oom else None
        with pytest.raises(UserError) as e:
            with phases("first step"):
                raise error
        assert str(e.value).startswith("preflight failed at first step: out of GPU memory at -B 64 (CUDA out of")
        assert "pass -B 32" in str(e.value) and "\n" not in str(e.value)


def test_out_of_memory_on_the_cpu_names_the_cpu_its_fixes_and_the_whole_size(tmp_path):
    """`--preflight -B 16384` on CPU (the logits alone over 50 GB): one line about the host's memory, with no GPU
    and no -B auto (refused on CPU) in it. And when the CPU allocator itself refuses, its byte count is given
    whole (a cut to length once left "21099026" of 211 GB) and the fix is a smaller -B."""
    write_shards(tmp_path / "d", [300000], split="val", first_index=0)
    write_shards(tmp_path / "d", [300000])
    message = main_error(train_gpt2.main, "--data_dir", tmp_path / "d", "--log_dir", tmp_path / "log", *TINY_MODEL,
                         "-B", 16384, "-T", 16, "--total_batch_size", 262144, "--preflight", "--device", "cpu")
    assert "preflight failed at inputs:" in message and "the host (1 process)" in message
    assert "GPU" not in message and "-B auto" not in message and "try -B 2048" in message
    args = train_gpt2.parse_args(["-B", "16384", "-T", "16", "--total_batch_size", "262144", "--device", "cpu"])
    phases = Phases(True, lambda e: train_gpt2.out_of_memory_error(args, e))
    with pytest.raises(UserError) as e:
        with phases("first step"):
            torch.empty(2 ** 50, dtype=torch.uint8)  # the real allocator's refusal (past any address space)
    assert str(e.value) == ("preflight failed at first step: out of memory on the CPU at -B 16384 (the allocator "
                            "refused 1,125,899,906,842,624 bytes); pass -B 8192 (the same --total_batch_size, with "
                            "more accumulation steps)")


def test_a_run_too_large_for_the_machine_is_refused_before_anything_is_built(tmp_path):
    """GPT-2 XL's weights, gradients and AdamW moments alone are 24.9 GB: on a 24 GB CPU box `--model gpt2-xl
    --preflight -B 1` built the model and passed 15 GB of memory with no word. Now the arithmetic comes first,
    in one line naming what would fit, within seconds."""
    need = 24.9e9 + 5.4e9  # the floor at -B 1 (checked below)
    if speed.device_memory_bytes("cpu") >= need:
        pytest.skip(f"this host has {speed.device_memory_bytes('cpu') / 1e9:.0f} GB: GPT-2 XL's floor fits")
    t0 = time.time()
    proc = run([sys.executable, os.path.join(REPO, "train_gpt2.py"), "--model", "gpt2-xl", "--preflight", "-B", "1",
                "--device", "cpu", "--log_dir", str(tmp_path / "log")], env={"TMPDIR": str(tmp_path)})
    assert time.time() - t0 < 30
    assert_one_line_error(proc, "preflight failed at inputs: this run needs at least 24.9 GB per process for the "
                          "weights, gradients and optimizer state and 5.4 GB for one micro-batch's activations at "
                          "-B 1, and the host (1 process) has ", "try a smaller --model or -T")
    assert not os.path.exists(tmp_path / "log") and leftovers(tmp_path) == []


def test_the_memory_floor_names_what_would_fit():
    args = train_gpt2.parse_args([])
    config = train_gpt2.gpt_config(args)
    n = 124_475_904
    with pytest.raises(UserError) as e:  # the default recipe on a 40 GB GPU: -B 64 is too much
        speed.check_memory(n, config, args, "cuda", 1, "bf16", 64, total=40e9)
    assert str(e.value) == ("this run needs at least 2.0 GB per process for the weights, gradients and optimizer "
                            "state and 45.7 GB for one micro-batch's activations at -B 64, and the GPU has 40.0 GB: "
                            "try -B 32, or --chunked_ce 8192, or --fsdp across more GPUs (under torchrun), or a "
                            "smaller --model or -T")
    speed.check_memory(n, config, args, "cuda", 1, "bf16", 64, total=80e9)  # an 80 GB one: fine
    with pytest.raises(UserError, match=r"the host \(2 processes\) has 24.0 GB: try -B 4, or"):  # CPU: RAM shared
        speed.check_memory(n, config, args, "cpu", 2, "fp32", 16, total=24e9)
