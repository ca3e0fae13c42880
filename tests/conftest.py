"""
Shared fixtures. Data comes from ../shared/data when it is there (CI), else from the network
exactly as the real code fetches it; with neither, the tests that need it skip with the reason.
"""

import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/data beside the checkout; GPT2_SHARED_DATA points elsewhere (the GPU machine, where it travels
# inside the working tree: see benchmarks/gpu.sh)
SHARED = os.environ.get("GPT2_SHARED_DATA") or os.path.join(os.path.dirname(REPO), "shared", "data")
sys.path.insert(0, REPO)

# hub lookups would retry for ~25 s before failing; tests never need the hub
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.path.isdir(os.path.join(SHARED, "tiktoken_cache")):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(SHARED, "tiktoken_cache"))

# the tests train tiny models in this process too: as train_gpt2.py does on CPU, keep freed memory for reuse
from machinery import speed  # noqa: E402

speed.keep_freed_cpu_memory()

TINY_MODEL = ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64"]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run with `pytest -m cuda`")
    config.addinivalue_line("markers",
                            "slow: whole training runs and long sweeps; `pytest -m \"not slow\"` leaves them out")


@pytest.fixture(autouse=True)
def test_timeout():
    """GPT2_TEST_TIMEOUT=N (benchmarks/gpu.sh tests sets it): a test still running after N seconds fails there,
    naming itself, and the next one starts; a short lease on a GPU machine still hears about every test."""
    seconds = int(os.environ.get("GPT2_TEST_TIMEOUT", 0))
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"still running after GPT2_TEST_TIMEOUT={seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="session")
def enc():
    """tiktoken's GPT-2 encoding, from the shared cache or the network."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:
        pytest.skip(f"GPT-2 BPE unavailable: no {SHARED}/tiktoken_cache and no network ({type(e).__name__})")


@pytest.fixture(scope="session")
def hellaswag_dir(tmp_path_factory, enc):
    """A HellaSwag cache dir holding hellaswag_val.jsonl; also exported as HELLASWAG_CACHE_DIR."""
    import hellaswag
    from machinery.common import UserError

    cache = str(tmp_path_factory.mktemp("hellaswag"))
    shared = os.path.join(SHARED, "hellaswag", "hellaswag_val_preprocessed.jsonl")
    if os.path.exists(shared):
        shutil.copy(shared, os.path.join(cache, "hellaswag_val.jsonl"))
    else:
        try:
            hellaswag.download("val", cache)
        except UserError as e:
            pytest.skip(f"HellaSwag val unavailable: no {shared} and no network ({e})")
    os.environ["HELLASWAG_CACHE_DIR"] = cache
    return cache


@pytest.fixture(scope="session")
def shakespeare_path():
    path = os.path.join(SHARED, "tinyshakespeare", "input.txt")
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    return path


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory, shakespeare_path, enc):
    """`fineweb.py --dataset shakespeare` (its download replaced by the local copy placed where it goes):
    50k-token shards, shard 0 = val, about 338k tokens in all."""
    import fineweb

    out = tmp_path_factory.mktemp("shakespeare") / "tinyshakespeare"
    os.makedirs(out)
    shutil.copy(shakespeare_path, out / "input.txt")
    fineweb.main(["--dataset", "shakespeare", "--out_dir", str(out), "--num_proc", "1"])
    return str(out)


def write_shards(root, lengths, split="train", first_index=1, dtype=np.uint16):
    """Shards whose token at offset j of shard i is (1000 * i + j) % 50000: every batch shows where it came from."""
    os.makedirs(root, exist_ok=True)
    paths = []
    for i, n in enumerate(lengths):
        path = os.path.join(root, f"edufineweb_{split}_{first_index + i:06d}.npy")
        np.save(path, ((1000 * i + np.arange(n)) % 50000).astype(dtype))
        paths.append(path)
    return paths


def run(args, cwd=None, timeout=600, env=None):
    """Run a command; stdout and stderr captured as text."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_script(script, *args, **kwargs):
    return run([sys.executable, os.path.join(REPO, script), *map(str, args)], **kwargs)


def assert_one_line_error(proc, *needles):
    """A user error: non-zero exit, no traceback, and a last stderr line that names the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    return last


def read_log(path):
    """log.txt -> {kind: {step: value}}"""
    out = {}
    with open(path) as f:
        for line in f:
            step, kind, value = line.split()
            out.setdefault(kind, {})[int(step)] = float(value)
    return out


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size): a fresh tmpfs of that size (e.g. "2m"), unmounted after the test: a disk that fills up.
    Mounting needs root (CI runs as root); elsewhere the test skips, saying so."""
    mounts = []

    def make(size):
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs for a full disk: {proc.stderr.strip() or 'mount failed'}")
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
