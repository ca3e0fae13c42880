"""fineweb.py on local corpora: shard layout, names, split documents, errors."""

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, assert_one_line_error, main_error, run, run_script

import fineweb


def expected_shards(texts, enc, shard_size, prefix="edufineweb"):
    """build-nanogpt's layout: the stream of <|endoftext|> + document tokens, cut every shard_size tokens."""
    stream = np.concatenate([np.array([enc.eot_token] + enc.encode_ordinary(t), dtype=np.uint16) for t in texts])
    out = []
    for i, start in enumerate(range(0, len(stream), shard_size)):
        buf = io.BytesIO()
        np.save(buf, stream[start:start + shard_size])
        out.append((f"{prefix}_{'val' if i == 0 else 'train'}_{i:06d}.npy", buf.getvalue()))
    return out


def shard_files(out_dir):
    """(name, bytes) of every shard in out_dir, in shard-index order (the name's last 10 characters)."""
    paths = sorted(glob.glob(os.path.join(out_dir, "*_*_*.npy")) + glob.glob(os.path.join(out_dir, "*_*_*.bin")),
                   key=lambda p: p[-10:])
    return [(os.path.basename(p), open(p, "rb").read()) for p in paths]


@pytest.fixture(scope="module")
def docs(enc):
    """Varied documents, one long enough to span several small shards."""
    base = ["The quick brown fox jumps over the lazy dog.", "Hello, world!", "",
            "Ünïcödé text and emoji 🚀 survive the round trip.", "x"]
    long_doc = " ".join(f"sentence number {i} of a long document." for i in range(300))
    return base * 3 + [long_doc] + base


def test_shards_match_build_nanogpt_layout(tmp_path, docs, enc):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    shard_size = 500  # the long document (~2.7k tokens) spans six shards
    fineweb.main(["--dataset", str(path), "--out_dir", str(tmp_path / "out"), "--shard_size", str(shard_size),
                  "--num_proc", "2"])
    got, want = shard_files(tmp_path / "out"), expected_shards(docs, enc, shard_size)
    assert [name for name, _ in got] == [name for name, _ in want]
    assert got == want
    assert got[0][0] == "edufineweb_val_000000.npy"
    # the long document fills at least one whole shard on its own: no <|endoftext|> in it
    assert any(enc.eot_token not in np.load(io.BytesIO(data)) for _, data in got[1:-1])


def test_document_ending_exactly_at_a_shard_end(tmp_path, enc):
    texts = [f"document {i} says something rather different." * (i + 1) for i in range(6)]
    lengths = [1 + len(enc.encode_ordinary(t)) for t in texts]
    shard_size = sum(lengths[:3])  # the third document closes shard 0 exactly; no empty shard follows
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    fineweb.main(["--dataset", str(path), "--out_dir", str(tmp_path / "out"), "--shard_size", str(shard_size)])
    got = shard_files(tmp_path / "out")
    assert got == expected_shards(texts, enc, shard_size)
    assert np.load(tmp_path / "out" / "edufineweb_train_000001.npy")[0] == enc.eot_token


def test_txt_folder_one_document_per_file_and_parquet(tmp_path, enc):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first file\nwith two lines\n", "second file", "third\n\nfile with a blank line"]
    os.makedirs(tmp_path / "txt")
    for i, t in enumerate(texts):  # names sort in document order
        (tmp_path / "txt" / f"doc{i}.txt").write_text(t)
    fineweb.main(["--dataset", str(tmp_path / "txt"), "--out_dir", str(tmp_path / "a"), "--shard_size", "12"])
    assert shard_files(tmp_path / "a") == expected_shards(texts, enc, 12)

    pq.write_table(pa.table({"content": texts}), tmp_path / "docs.parquet")
    fineweb.main(["--dataset", str(tmp_path / "docs.parquet"), "--text_column", "content",
                  "--out_dir", str(tmp_path / "b"), "--shard_size", "12"])
    assert shard_files(tmp_path / "b") == shard_files(tmp_path / "a")


def test_spawn_start_method_gives_the_same_shards(tmp_path, docs):
    """macOS and Windows start workers with spawn: the module must import cleanly and main() be guarded."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    script = tmp_path / "spawn_run.py"
    script.write_text(f"import multiprocessing as mp, sys\nsys.path.insert(0, {REPO!r})\nimport fineweb\n"
                      "if __name__ == '__main__':\n    mp.set_start_method('spawn')\n    fineweb.main(sys.argv[1:])\n")
    common = ["--dataset", path, "--shard_size", 700, "--num_proc", 2]
    proc = run([sys.executable, str(script), *map(str, common), "--out_dir", str(tmp_path / "spawn")])
    assert proc.returncode == 0, proc.stderr
    fineweb.main([*map(str, common), "--out_dir", str(tmp_path / "fork")])
    assert shard_files(tmp_path / "spawn") == shard_files(tmp_path / "fork")


def test_existing_shards_are_kept_unless_overwrite(tmp_path, docs, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "out"
    fineweb.main(["--dataset", str(path), "--out_dir", str(out), "--shard_size", "500"])
    before = shard_files(out)
    capsys.readouterr()
    fineweb.main(["--dataset", str(path), "--out_dir", str(out), "--shard_size", "500"])
    assert "is complete already" in capsys.readouterr().out
    msg = main_error(fineweb.main, "--dataset", path, "--out_dir", out, "--shard_size", 100000)
    assert "holds a run made with other --shard_size" in msg and "--overwrite" in msg
    assert shard_files(out) == before
    os.remove(out / "edufineweb_progress.json")  # shards from elsewhere, e.g. build-nanogpt's fineweb.py
    msg = main_error(fineweb.main, "--dataset", path, "--out_dir", out, "--shard_size", 500)
    assert f"already holds {len(before)} edufineweb shards that this script did not record" in msg
    assert shard_files(out) == before
    fineweb.main(["--dataset", str(path), "--out_dir", str(out), "--shard_size", "100000", "--overwrite"])
    assert [name for name, _ in shard_files(out)] == ["edufineweb_val_000000.npy"]
    assert "only the val shard was written" in capsys.readouterr().out


NOVELS = os.path.join(os.path.dirname(REPO), "shared", "data", "novels", "english_novels_95.jsonl.xz")


@pytest.fixture(scope="module")
def novels(enc):
    if not os.path.exists(NOVELS):
        pytest.skip(f"no {NOVELS}")
    return NOVELS


@pytest.mark.slow
def test_killed_run_continues_byte_identical(tmp_path, novels):
    """Kill -9 after some shards, twice, and rerun: the shards equal an uninterrupted run's, byte for byte.
    The novels are ~200k tokens each and span several 40k-token shards: the restart points fall inside
    documents, and the second run is killed while still inside the document it resumed in."""
    args = ["--dataset", novels, "--shard_size", 40_000, "--num_proc", 2, "--chunk_chars", 300_000]
    reference = run_script("fineweb.py", *args, "--out_dir", tmp_path / "ref")
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    for kill_after in (3, 6):
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, "fineweb.py"), *map(str, args), "--out_dir",
                                 str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not os.path.exists(out / f"edufineweb_train_{kill_after:06d}.npy"):
            assert proc.poll() is None, "finished before the kill"
            time.sleep(0.005)
        proc.kill()
        proc.wait()
        with open(out / "edufineweb_progress.json") as f:
            state = json.load(f)
        # the shard file appears a moment before the progress record: it may name this shard or the next
        assert not state.get("done") and state["next_shard"] >= kill_after and state["offset"] > 0
    proc = run_script("fineweb.py", *args, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "continuing after shard" in proc.stdout
    assert shard_files(out) == shard_files(tmp_path / "ref")
    assert len(shard_files(out)) == 468  # 18,711,220 tokens
    assert "18,711,220 tokens" in reference.stdout and "95 documents" in reference.stdout
    assert "M tokens/s" in reference.stdout


def test_restart_inside_a_document_that_spans_several_shards(tmp_path, enc):
    """A crash right after a shard whose end falls inside a long document, with more cuts to come inside it."""
    texts = ["short one", " ".join(f"word{i}" for i in range(3000)), "after the long one", "last"]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    lengths = [1 + len(enc.encode_ordinary(t)) for t in texts]
    shard_size = lengths[1] // 5  # the long document spans five shards or more
    argv = ["--dataset", str(path), "--shard_size", str(shard_size), "--num_proc", "1"]
    fineweb.main(argv + ["--out_dir", str(tmp_path / "ref")])
    reference = shard_files(tmp_path / "ref")
    # the state after shard 2: its end lies inside document 1, and so does the next shard's
    args = fineweb.parse_args(argv + ["--out_dir", str(tmp_path / "out")])
    os.makedirs(args.out_dir)
    for name, data in reference[:3]:
        (tmp_path / "out" / name).write_bytes(data)
    offset = 3 * shard_size - lengths[0]
    assert 0 < offset and offset + shard_size < lengths[1]
    fineweb.save_progress(args, next_shard=3, doc=1, offset=offset)
    fineweb.main(argv + ["--out_dir", str(tmp_path / "out")])
    assert shard_files(tmp_path / "out") == reference

    # and every restart point recorded on the way is where that shard's end really is in the stream
    fineweb.init_worker()
    tokens, doc_lengths = fineweb.tokenize_batch(texts[1:])
    records = []
    writer = fineweb.ShardWriter(str(tmp_path / "again"), "x", shard_size, "npy", 3, 1,
                                 lambda *state: records.append(state))
    os.makedirs(tmp_path / "again")
    writer.add(tokens, doc_lengths, skip=offset)
    writer.close()
    starts = np.cumsum([0] + lengths)
    assert len(records) >= 3 and [r[0] for r in records] == list(range(4, 4 + len(records)))
    for next_shard, doc, doc_offset in records[:-1]:
        assert starts[doc] + doc_offset == next_shard * shard_size and doc_offset < lengths[doc]
    assert records[-1] == (len(reference), len(texts), 0)


def test_streaming_and_llm_c_bin_format(tmp_path, docs, enc):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    common = ["--dataset", str(path), "--shard_size", "500"]
    fineweb.main(common + ["--out_dir", str(tmp_path / "plain")])
    fineweb.main(common + ["--out_dir", str(tmp_path / "streamed"), "--streaming"])
    assert shard_files(tmp_path / "streamed") == shard_files(tmp_path / "plain")
    fineweb.main(common + ["--out_dir", str(tmp_path / "bin"), "--format", "bin"])
    bins, npys = shard_files(tmp_path / "bin"), shard_files(tmp_path / "plain")
    assert [n for n, _ in bins] == [n.replace(".npy", ".bin") for n, _ in npys]
    for (_, b), (_, n) in zip(bins, npys):
        header = np.frombuffer(b[:1024], dtype=np.int32)
        tokens = np.load(io.BytesIO(n))
        assert tuple(header[:3]) == (20240520, 1, len(tokens)) and not header[3:].any()
        assert b[1024:] == tokens.tobytes()


def test_shakespeare_preset(tmp_path, shakespeare_path, enc):
    """--dataset shakespeare downloads Tiny Shakespeare to OUT/input.txt; a file already there is used as is."""
    out = tmp_path / "tinyshakespeare"
    os.makedirs(out)
    shutil.copy(shakespeare_path, out / "input.txt")
    proc = run_script("fineweb.py", "--dataset", "shakespeare", "--out_dir", out)
    assert proc.returncode == 0, proc.stderr
    text = open(shakespeare_path).read()
    assert shard_files(out) == expected_shards([text], enc, 50_000, prefix="tinyshakespeare")
    names = [n for n, _ in shard_files(out)]
    assert names[:2] == ["tinyshakespeare_val_000000.npy", "tinyshakespeare_train_000001.npy"]


@pytest.mark.slow
def test_bad_inputs_give_one_line_errors(tmp_path, enc):
    proc = run_script("fineweb.py", "--dataset", "no-such-org/no-such-dataset", "--out_dir", tmp_path / "o")
    assert_one_line_error(proc, "could not load no-such-org/no-such-dataset", "Hugging Face hub", "--dataset")
    proc = run_script("fineweb.py", "--dataset", tmp_path / "missing.jsonl", "--out_dir", tmp_path / "o")
    assert_one_line_error(proc, "missing.jsonl does not exist")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    proc = run_script("fineweb.py", "--dataset", tmp_path / "c.jsonl", "--out_dir", tmp_path / "o")
    assert_one_line_error(proc, "has no 'text' column", "body", "--text_column")
    (tmp_path / "notes.md").write_text("hi")
    proc = run_script("fineweb.py", "--dataset", tmp_path / "notes.md", "--out_dir", tmp_path / "o")
    assert_one_line_error(proc, "expected .jsonl, .json, .parquet or .txt")
    proc = run_script("fineweb.py", "--shard_size", "0")
    assert_one_line_error(proc, "--shard_size, --num_proc and --chunk_chars must be positive")
    proc = run_script("fineweb.py", "--dataset", "fineweb", "--remote_name", "sample-1BT")
    assert_one_line_error(proc, "--remote_name for fineweb is one of sample-10BT, sample-100BT, sample-350BT")
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")


def children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_one_writer_per_folder_and_a_dead_tokenizer_process_stops_the_run(tmp_path, novels):
    args = [sys.executable, os.path.join(REPO, "fineweb.py"), "--dataset", novels, "--shard_size", 40_000,
            "--num_proc", 2, "--chunk_chars", 100_000, "--out_dir", tmp_path / "out"]
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not glob.glob(str(tmp_path / "out" / "edufineweb_train_*.npy")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    second = run_script(*map(str, args[1:]))
    assert_one_line_error(second, f"{tmp_path / 'out'} is in use by pid {proc.pid} on ", "--out_dir")
    # the OOM killer takes a tokenizer process: one line, within seconds, not a hang
    workers = [pid for pid in children(proc.pid) if open(f"/proc/{pid}/cmdline").read().split("\0")[1:2] == [args[1]]]
    assert len(workers) == 2, workers
    os.kill(workers[0], 9)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
    assert "a tokenizer process died" in err.strip().splitlines()[-1]
    time.sleep(0.5)  # the other worker follows its parent out
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")
                and open(f"/proc/{pid}/stat").read().split()[2] != "Z"]


def test_every_kill_point_reruns_cleanly_and_a_lost_shard_is_found(tmp_path, docs):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    argv = ["--dataset", str(path), "--shard_size", "500", "--num_proc", "1"]
    fineweb.main(argv + ["--out_dir", str(tmp_path / "ref")])
    reference = shard_files(tmp_path / "ref")
    # killed between the first shard's rename and its progress record: the record made at the start is there
    out = tmp_path / "out"
    args = fineweb.parse_args(argv + ["--out_dir", str(out)])
    os.makedirs(out)
    fineweb.save_progress(args, next_shard=0, doc=0, offset=0, shards={})
    (out / reference[0][0]).write_bytes(reference[0][1])
    fineweb.main(argv + ["--out_dir", str(out)])
    assert shard_files(out) == reference
    # a finished folder that lost a shard, or had one changed, is not "complete"
    os.remove(out / reference[2][0])
    msg = main_error(fineweb.main, *argv, "--out_dir", out)
    assert f"{reference[2][0]}, which this script wrote, is gone" in msg and "--overwrite" in msg
    (out / reference[2][0]).write_bytes(reference[3][1])
    assert "is changed" in main_error(fineweb.main, *argv, "--out_dir", out)
    (out / "edufineweb_progress.json").write_text('{"fingerprint": ')
    assert "progress.json is damaged" in main_error(fineweb.main, *argv, "--out_dir", out)


def test_bad_documents_and_an_empty_corpus_are_one_line_errors(tmp_path, enc):
    def error(name, content):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SystemExit) as e:
            fineweb.main(["--dataset", str(tmp_path / name), "--out_dir", str(tmp_path / "out"), "--streaming",
                          "--num_proc", "1"])
        assert str(e.value).startswith("fineweb.py: error: ") and "\n" not in str(e.value)
        assert not os.path.exists(tmp_path / "out")  # a failed start leaves no folder behind
        return str(e.value)

    assert "row 1 has no text" in error("null.jsonl", b'{"text": "fine"}\n{"text": null}\n')
    assert "bytes.txt" in error("bytes.txt", b"caf\xe9 au lait\n")  # latin-1, not UTF-8
    assert "holds no documents" in error("empty.jsonl", b"")
