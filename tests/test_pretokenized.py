"""`fineweb.py --pretokenized`: downloading llm.c token shards through the real huggingface_hub client, from a
stand-in hub on 127.0.0.1 (tests/hub_server.py), with kills, lies, errors and a small disk."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, TINY_MODEL, assert_one_line_error, main_output, run, run_script
from hub_server import HubServer, write_bin_shard

import train_gpt2

pytestmark = pytest.mark.slow  # real servers and processes: left out of `pytest -m "not slow"`

REPO_ID = "someone/tiny-gpt2-shards"
TOKENS = 40_000  # per shard: 80 KB, enough for a few training steps of a tiny model


def serve_shards(root, n_train, prefix="tiny", repo_id=REPO_ID, lie_in=None):
    """val + n_train train shards of pseudo-random GPT-2 ids under the hub's root; returns {name: bytes}."""
    rng = np.random.default_rng(0)
    served = {}
    for i in range(n_train + 1):
        name = f"{prefix}_{'val' if i == 0 else 'train'}_{i:06d}.bin"
        path = os.path.join(root, *repo_id.split("/"), name)
        write_bin_shard(path, rng.integers(0, 50257, TOKENS), lie_by=1000 if name == lie_in else 0)
        with open(path, "rb") as f:
            served[name] = f.read()
    return served


def fetch(server, out_dir, *flags, name=REPO_ID, timeout=120, **kwargs):
    env = {"HF_ENDPOINT": server.url if server else "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    return run_script("fineweb.py", "--pretokenized", name, "--out_dir", out_dir, *flags, env=env, timeout=timeout,
                      **kwargs)


def shard_bytes(out_dir):
    out = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".bin"):
            with open(os.path.join(out_dir, name), "rb") as f:
                out[name] = f.read()
    return out


@pytest.fixture
def hub(tmp_path):
    with HubServer(tmp_path / "hub") as server:
        yield server


def test_download_is_byte_identical_and_trains(hub, tmp_path):
    served = serve_shards(hub.root, 3)
    out = tmp_path / "shards"
    proc = fetch(hub, out, "--num_shards", 2)
    assert proc.returncode == 0, proc.stderr
    want = {k: v for k, v in served.items() if not k.endswith("000003.bin")}
    assert shard_bytes(out) == want
    assert sorted(os.listdir(out)) == sorted([*want, "fineweb.lock", "pretokenized_progress.json"])  # staging gone
    with open(out / "pretokenized_progress.json") as f:
        assert sorted(json.load(f)["shards"]) == sorted(want)
    assert "3 shards" in proc.stdout + proc.stderr
    # a rerun finds everything intact and fetches nothing
    n = len(hub.requests)
    again = fetch(hub, out, "--num_shards", 2)
    assert again.returncode == 0 and "nothing to fetch" in again.stdout, again.stderr
    assert not [r for r in hub.requests[n:] if "/resolve/" in r[1]]
    train = main_output(train_gpt2.main, "--data_dir", out, "--log_dir", tmp_path / "log", *TINY_MODEL, "-B", 4,
                        "-T", 32, "--total_batch_size", 128, "--max_steps", 3, "--warmup_steps", 1, "--eval_every",
                        2, "--val_steps", 1, "--no-hellaswag", "--no-sample")
    assert "train shards 2, val shards 1" in train


def test_preset_names_map_to_the_datasets_they_name(tmp_path):
    sys.path.insert(0, REPO)
    from machinery import pretokenized

    assert pretokenized.SOURCES["fineweb-edu-10B"] == "kjj0/finewebedu10B-gpt2"
    assert pretokenized.SOURCES["fineweb-10B"] == "kjj0/fineweb10B-gpt2"
    assert pretokenized.SOURCES["fineweb-edu-100B"] == "karpathy/fineweb-edu-100B-gpt2-token-shards"
    with HubServer(tmp_path / "hub") as hub:
        served = serve_shards(hub.root, 2, prefix="finewebedu", repo_id="kjj0/finewebedu10B-gpt2")
        proc = fetch(hub, tmp_path / "fineweb-edu-10B", "--num_shards", 2, name="fineweb-edu-10B")
        assert proc.returncode == 0, proc.stderr
        assert shard_bytes(tmp_path / "fineweb-edu-10B") == served
        # without --out_dir the folder is named after the preset
        os.makedirs(tmp_path / "elsewhere")
        default = run([sys.executable, os.path.join(REPO, "fineweb.py"), "--pretokenized", "fineweb-edu-10B",
                       "--num_shards", "1"], cwd=tmp_path / "elsewhere",
                      env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
        assert default.returncode == 0, default.stderr
        assert sorted(shard_bytes(tmp_path / "elsewhere" / "fineweb-edu-10B")) == \
            ["finewebedu_train_000001.bin", "finewebedu_val_000000.bin"]


def test_kill9_mid_download_then_rerun_completes_and_nothing_partial_was_visible(hub, tmp_path):
    served = serve_shards(hub.root, 3)
    hub.bytes_per_second = 100_000  # ~1 s a shard: time to kill it in the middle
    out = tmp_path / "shards"
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "fineweb.py"), "--pretokenized", REPO_ID,
                             "--out_dir", str(out), "--jobs", "2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen, deadline = [], time.time() + 60
    while proc.poll() is None and time.time() < deadline:  # watch every name that appears, until one is done
        for name in os.listdir(out) if os.path.isdir(out) else []:
            if name.endswith(".bin"):
                seen.append((name, os.path.getsize(out / name)))
        if len([n for n in os.listdir(out) if n.endswith(".bin")] if os.path.isdir(out) else []) >= 1:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(r[0] == "GET" and "/resolve/" in r[1] for r in hub.requests)
    done_before = shard_bytes(out)
    assert 1 <= len(done_before) < 4, sorted(done_before)  # killed with shards still to come
    assert all(served[name] == data for name, data in done_before.items())
    assert all(size == len(served[name]) for name, size in seen)  # a shard's name never showed a partial file
    hub.bytes_per_second = None
    n = len(hub.requests)
    again = fetch(hub, out)
    assert again.returncode == 0, again.stderr
    assert shard_bytes(out) == served
    fetched = {os.path.basename(r[1]) for r in hub.requests[n:] if r[0] == "GET" and "/resolve/" in r[1]}
    assert not fetched & set(done_before)  # what was complete is not fetched again


def test_a_shard_whose_header_lies_is_removed_with_one_line(hub, tmp_path):
    serve_shards(hub.root, 2, lie_in="tiny_train_000002.bin")
    out = tmp_path / "shards"
    proc = fetch(hub, out, "--jobs", 1)
    assert_one_line_error(proc, "tiny_train_000002.bin", REPO_ID, "header promises")
    assert "tiny_train_000002.bin" not in os.listdir(out)
    assert not [n for n in os.listdir(out / ".download") if n.endswith(".bin")] if (out / ".download").exists() \
        else True


def test_an_unknown_dataset_or_file_is_one_line(hub, tmp_path):
    serve_shards(hub.root, 1)
    assert_one_line_error(fetch(hub, tmp_path / "a", name="nobody/nothing"), "no dataset nobody/nothing")
    assert not (tmp_path / "a").exists()  # nothing written: the folder it made is gone again
    os.makedirs(os.path.join(hub.root, "someone", "text-only"))
    with open(os.path.join(hub.root, "someone", "text-only", "data.jsonl"), "w") as f:
        f.write("{}\n")
    assert_one_line_error(fetch(hub, tmp_path / "b", name="someone/text-only"), "holds no llm.c shards")
    assert_one_line_error(fetch(hub, tmp_path / "c", "--num_shards", 5), "--num_shards 5", "holds 1 train shards")


def test_a_server_error_then_no_server_are_one_line_each_and_bounded(hub, tmp_path):
    serve_shards(hub.root, 1)
    hub.status = 500
    t0 = time.time()
    # both at once: huggingface_hub retries each for about 25 s, with backoff
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "fineweb.py"), "--pretokenized", REPO_ID,
                               "--out_dir", str(tmp_path / out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, HF_HUB_OFFLINE="0", HF_ENDPOINT=url))
             for out, url in [("a", hub.url), ("b", "http://127.0.0.1:9")]]
    for proc in procs:
        proc.stdout, proc.stderr = proc.communicate(timeout=120)
    assert time.time() - t0 < 90
    assert_one_line_error(procs[0], "answered 500", "after retries")
    assert_one_line_error(procs[1], "cannot reach the hub at http://127.0.0.1:9", "HF_ENDPOINT")
    # no hub at all is found out first, in one request: one line and no retries (11 lines over about 34 s before)
    t0 = time.time()
    unreachable = run_script("fineweb.py", "--pretokenized", REPO_ID, "--out_dir", tmp_path / "d",
                             env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert time.time() - t0 < 15 and len(unreachable.stderr.strip().splitlines()) == 1, unreachable.stderr
    assert_one_line_error(unreachable, "cannot reach the hub at http://127.0.0.1:9")
    offline = run_script("fineweb.py", "--pretokenized", REPO_ID, "--out_dir", tmp_path / "c",
                         env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(offline, "HF_HUB_OFFLINE")


def test_a_refusing_or_rate_limiting_hub_is_one_line_saying_so(hub, tmp_path):
    """403 and 429 on the files (the listing served): huggingface_hub wraps the failed HEAD as a missing file, and
    the line said the repo "has no file ...; check the name". Now it says what the hub answered. One 429 (with
    Retry-After) is retried by the client, and the download goes on."""
    serve_shards(hub.root, 1)
    hub.file_status = 403
    assert_one_line_error(fetch(hub, tmp_path / "a"), "403 forbidden", "set HF_TOKEN")
    hub.file_status, hub.retry_after, hub.file_errors = 429, 1, 1
    proc = fetch(hub, tmp_path / "b")
    assert proc.returncode == 0 and hub.file_errors == 0, proc.stderr[-2000:]  # refused once, then served
    assert shard_bytes(tmp_path / "b") == shard_bytes(os.path.join(hub.root, *REPO_ID.split("/")))
    hub.retry_after, hub.file_errors = 1, None  # for ever
    assert_one_line_error(fetch(hub, tmp_path / "c"), "429 too many requests", "or pass fewer --jobs")


def test_more_shards_later_fetches_only_the_new_ones(hub, tmp_path, shakespeare_path):
    served = serve_shards(hub.root, 3)
    out = tmp_path / "shards"
    assert fetch(hub, out, "--num_shards", 1).returncode == 0
    assert sorted(shard_bytes(out)) == ["tiny_train_000001.bin", "tiny_val_000000.bin"]
    n = len(hub.requests)
    proc = fetch(hub, out, "--num_shards", 3)
    assert proc.returncode == 0, proc.stderr
    got = sorted(os.path.basename(r[1]) for r in hub.requests[n:] if r[0] == "GET" and "/resolve/" in r[1])
    assert got == ["tiny_train_000002.bin", "tiny_train_000003.bin"]
    assert shard_bytes(out) == served
    # a damaged shard (recorded, then changed) is fetched again; a tokenized folder is never mixed in
    with open(out / "tiny_train_000002.bin", "r+b") as f:
        f.seek(2000)
        f.write(b"\xff\xff")
    assert fetch(hub, out, "--num_shards", 3).returncode == 0
    assert shard_bytes(out) == served
    mixed = tmp_path / "tokenized"
    os.makedirs(mixed)
    np.save(mixed / "edufineweb_val_000000.npy", np.zeros(10, dtype=np.uint16))
    assert_one_line_error(fetch(hub, mixed), "edufineweb_val_000000.npy", "never mixed")
    tokenize = run_script("fineweb.py", "--dataset", shakespeare_path, "--out_dir", out)
    assert_one_line_error(tokenize, "downloaded", "--out_dir")


def test_too_little_disk_is_one_line_and_writes_nothing(hub, tmp_path, small_disk):
    serve_shards(hub.root, 3)  # 4 x 81 KB
    disk = small_disk("200k")
    proc = fetch(hub, disk / "shards")
    assert_one_line_error(proc, "GB more", "free", "--num_shards")
    assert os.listdir(disk) == []
    assert not [r for r in hub.requests if "/resolve/" in r[1]]


def test_ctrl_c_stops_with_one_line_and_the_rerun_resumes(hub, tmp_path):
    served = serve_shards(hub.root, 2)
    hub.bytes_per_second = 50_000
    out = tmp_path / "shards"
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "fineweb.py"), "--pretokenized", REPO_ID,
                             "--out_dir", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(r[0] == "GET" and "/resolve/" in r[1] for r in hub.requests) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert time.time() - t0 < 5  # at once, not after the transfers under way
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1].startswith("fineweb.py: interrupted; rerun the same command to resume")
    assert not shard_bytes(out) or all(served[n] == d for n, d in shard_bytes(out).items())
    hub.bytes_per_second = None
    again = fetch(hub, out)
    assert again.returncode == 0, again.stderr
    assert shard_bytes(out) == served
