"""
Shared fixtures. Data comes from ../shared/data when it is there (CI), else from the network
exactly as the real code fetches it; with neither, the tests that need it skip with the reason.
"""

import contextlib
import fcntl
import io
import json
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

# one compute thread in each test process and each process a test starts: the tests run side by side (pytest-xdist,
# one worker per core), and two-thread processes would wait on each other's cores. A user's own setting is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile's C++ kernels built in the compiling process, not by a pool of worker processes of its own: no pool
# to start in each compiling test (7 of a cold compile's 46 CPU seconds here); the same kernels either way
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# each compiled graph's C++ kernels and its wrapper in one C++ file, one compiler run, instead of a compiler run per
# kernel (each about 1.2 s here, most of it loading the precompiled headers and linking): the same kernels, the same
# losses to the last printed digit; a cold compile of the tiny model's training step 27 CPU seconds instead of 41
os.environ.setdefault("TORCHINDUCTOR_CPP_WRAPPER", "1")
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


DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def pytest_addoption(parser):
    parser.addoption("--write-durations", action="store_true",
                     help=f"after the run, write each test's seconds (setup, call and teardown) to {DURATIONS}, "
                          "the order the next runs start the tests in")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); run with `pytest -m cuda`")
    config.addinivalue_line("markers",
                            "slow: whole training runs and long sweeps; `pytest -m \"not slow\"` leaves them out")
    # one compile cache, shared by pytest-xdist's workers (they inherit this environment) and every process they
    # start: a graph compiled by one test is loaded, not compiled again, by the next, and by the next run (as torch
    # keeps its own in /tmp/torchinductor_$USER; its keys hold the graph, the flags and torch's version). For a cold
    # run, point TORCHINDUCTOR_CACHE_DIR at an empty folder.
    if "PYTEST_XDIST_WORKER" not in os.environ and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = suite_compile_cache()


def suite_compile_cache(limit_bytes=2 << 30):
    """The suite's own compile cache folder, emptied once it holds more than `limit_bytes` (graphs of trees
    long gone): a whole run's graphs took about 25 MB."""
    folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gpt2-repro-tests",
                          "inductor")
    held = 0
    for d, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):  # (removed meanwhile by a run beside this one)
                held += os.path.getsize(os.path.join(d, f))
    if held > limit_bytes:
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)
    return folder


def pytest_unconfigure(config):
    if config.getoption("--write-durations") and "PYTEST_XDIST_WORKER" not in os.environ and TEST_SECONDS:
        with open(DURATIONS, "w") as f:
            json.dump({k: round(v, 1) for k, v in sorted(TEST_SECONDS.items())}, f, indent=0)
            f.write("\n")


TEST_SECONDS = {}  # nodeid: seconds, for --write-durations


def pytest_runtest_logreport(report):
    """(In the controller under xdist, with every worker's reports.) A test's seconds, its phases added up."""
    TEST_SECONDS[report.nodeid] = TEST_SECONDS.get(report.nodeid, 0.0) + report.duration


def pytest_collection_modifyitems(config, items):
    """The slowest first, by tests/durations.json (a new test counts as a slow one if it is marked so): under
    xdist (`-n`, `--dist loadgroup`) the long tests start at once, and the last minutes are left to short ones,
    not to one long test running alone. A group of tests (`xdist_group`) is placed as one, by its total."""
    try:
        with open(DURATIONS) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}

    def group(item):
        mark = item.get_closest_marker("xdist_group")
        return (mark.kwargs.get("name") or mark.args[0]) if mark else item.nodeid

    def seconds(item):
        return known.get(item.nodeid, 30.0 if item.get_closest_marker("slow") else 1.0)

    totals = {}
    for item in items:
        totals[group(item)] = totals.get(group(item), 0.0) + seconds(item)
    first_seen = {}
    for i, item in enumerate(items):
        first_seen.setdefault(group(item), i)
    items.sort(key=lambda item: (-totals[group(item)], first_seen[group(item)]))


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
def shared_root(tmp_path_factory):
    """A folder every pytest process of this run shares: under xdist each worker's basetemp is inside it."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if "PYTEST_XDIST_WORKER" in os.environ else base


@pytest.fixture(scope="session")
def build_once(shared_root):
    """build_once(name, make) -> what make(path) returned (JSON), make having run once in this run: the first
    process to ask builds under a lock, the others wait for it and read the same folder. Shards and reference
    runs that several tests read are made once, however xdist spreads those tests over its workers. The
    readers must copy what they change."""
    def once(name, make):
        path, done = shared_root / name, shared_root / f"{name}.done.json"
        with open(shared_root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on an exception
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)  # a build that failed in another process
                result = make(path)
                done.write_text(json.dumps(result))
            return json.loads(done.read_text())
    return once


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
def shakespeare_shards(build_once, shakespeare_path, enc):
    """`fineweb.py --dataset shakespeare` (its download replaced by the local copy placed where it goes):
    50k-token shards, shard 0 = val, about 338k tokens in all."""
    import fineweb

    def make(root):
        out = root / "tinyshakespeare"
        os.makedirs(out)
        shutil.copy(shakespeare_path, out / "input.txt")
        fineweb.main(["--dataset", "shakespeare", "--out_dir", str(out), "--num_proc", "1"])
        return str(out)

    return build_once("shakespeare", make)


def write_shards(root, lengths, split="train", first_index=1, dtype=np.uint16):
    """Shards whose token at offset j of shard i is (1000 * i + j) % 50000: every batch shows where it came from."""
    os.makedirs(root, exist_ok=True)
    paths = []
    for i, n in enumerate(lengths):
        path = os.path.join(root, f"edufineweb_{split}_{first_index + i:06d}.npy")
        np.save(path, ((1000 * i + np.arange(n)) % 50000).astype(dtype))
        paths.append(path)
    return paths


def shards_once(build_once, name, train, val):
    """write_shards' train shards of these lengths and val shards of those, made once in the test run: the folder."""
    def make(root):
        write_shards(root, train)
        write_shards(root, val, split="val", first_index=0)
        return str(root)

    return build_once(name, make)


@pytest.fixture(scope="session")
def core_bundle(build_once):
    """A stand-in CORE eval bundle (tests/core_bundle.py): its zip's path."""
    from core_bundle import write_bundle

    def make(root):
        os.makedirs(root)
        return write_bundle(root / "eval_bundle.zip")

    return build_once("core_bundle", make)


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


def main_output(main, *argv):
    """A script's main(argv) in this process, run to a clean exit: what it printed. The code path a fresh process
    runs, without its start-up (about 3 CPU seconds: the import of torch alone is 2.5)."""
    out, code = io.StringIO(), 0
    with contextlib.redirect_stdout(out):
        try:
            main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    assert code in (0, None), f"{code}\n{out.getvalue()[-3000:]}"
    return out.getvalue()


def main_error(main, *argv):
    """A script's main(argv) in this process, stopped by a user error: the one-line message it exits with (what a
    terminal shows last). The code path a fresh process runs, without its start-up; tests about processes
    themselves (signals, launchers, a kill) start real ones."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    message = str(e.value.code)
    assert e.value.code not in (0, None) and "\n" not in message, message
    return message


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
