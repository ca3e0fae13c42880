"""
Past one launcher: two torchrun launchers rendezvousing as two nodes on this machine write the log one
launcher writes, and `torchrun --max-restarts` heals a run whose rank was killed, to the same log and
weights; a diverged run is not restarted into diverging again. Real processes, gloo, kill -9.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY_MODEL, run, shards_once
from test_resume import descendants, log_bytes, logged, wait_until

pytestmark = pytest.mark.slow  # real training processes

# torchrun sets OMP_NUM_THREADS=1 for several processes on one launcher; a launcher of one process does not, and
# the thread count changes how a CPU matmul sums: give both the same
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(build_once):
    return shards_once(build_once, "multinode_data", [5 * 128 + 1, 3 * 128 + 1, 4 * 128 + 1], [4 * 128 + 1])


def train_args(data, log_dir, *extra):
    return [str(a) for a in [os.path.join(REPO, "train_gpt2.py"), "--data_dir", data, "--log_dir", log_dir,
                             *TINY_MODEL, "-B", 2, "-T", 32, "--total_batch_size", 256, "--max_steps", 16,
                             "--warmup_steps", 2, "--eval_every", 5, "--val_steps", 2, "--no-hellaswag",
                             "--no-sample", "--save_every", 3, *extra]]


def torchrun(*flags):
    return [sys.executable, "-m", "torch.distributed.run", *flags]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(log_dir):
    return torch.load(os.path.join(log_dir, "model_00015.pt"), weights_only=True)["model"]


def assert_same_run(log_dir, reference):
    assert log_bytes(log_dir) == log_bytes(reference)
    ours, theirs = final_weights(log_dir), final_weights(reference)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.fixture(scope="module")
def reference(data, build_once):
    """One launcher, two processes (made once in the test run)."""
    def make(root):
        proc = run(torchrun("--standalone", "--nproc_per_node=2", *train_args(data, root / "log")))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return str(root / "log")

    return build_once("multinode_reference", make)


def test_two_launchers_as_two_nodes_write_what_one_launcher_writes(data, reference, tmp_path):
    """The README's multi-node command, both nodes on 127.0.0.1: c10d rendezvous, one process per node."""
    log_dir, port = str(tmp_path / "log"), free_port()
    nodes = [subprocess.Popen(torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                                       f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test",
                                       *train_args(data, log_dir)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, **ONE_THREAD))
             for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert any("processes 2" in out for out in outputs)
    assert_same_run(log_dir, reference)


def worker_of_rank(launcher, rank):
    """The pid of the training process with this RANK under a torchrun launcher."""
    for pid in descendants(launcher.pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(b"train_gpt2.py" in part for part in open(
                f"/proc/{pid}/cmdline", "rb").read().split(b"\0")):
            return pid
    return None


def test_max_restarts_heals_a_killed_rank_to_the_same_run(data, reference, tmp_path):
    log_dir = str(tmp_path / "log")
    heal = torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=2", *train_args(data, log_dir))
    # without its store apart, a restarted rank could read a dead rank's address: refused at once, in one line
    refused = run(heal)
    assert refused.returncode != 0 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in refused.stderr
    assert not os.path.exists(os.path.join(log_dir, "log.txt"))

    out = open(tmp_path / "out.txt", "w")
    launcher = subprocess.Popen(heal, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    wait_until(launcher, logged(log_dir, "7 train"))
    os.kill(worker_of_rank(launcher, 1), signal.SIGKILL)  # a rank lost mid-run; torchrun restarts them all
    assert launcher.wait(timeout=300) == 0, open(tmp_path / "out.txt").read()[-3000:]
    assert "resuming at step" in open(tmp_path / "out.txt").read()
    assert_same_run(log_dir, reference)


def test_a_diverged_run_is_not_restarted_into_diverging_again(data, tmp_path):
    """The first attempt diverges (exit 3); every restart finds its diverged.txt and stops before a step."""
    log_dir = str(tmp_path / "log")
    t0 = time.time()
    proc = run(torchrun("--standalone", "--nproc_per_node=2", "--max-restarts=2",
                        *train_args(data, log_dir, "--max_lr", 1e12)),
               env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert proc.stderr.count("is not resumed with the same command") >= 2  # both restarts, each at once
    assert proc.stdout.count("validation loss") == 1  # only the first attempt trained
    assert os.path.exists(os.path.join(log_dir, "diverged.txt"))
