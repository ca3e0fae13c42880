"""fineweb.py on local corpora: shard layout, names, split documents, errors."""

import glob
import io
import json
import os
import sys

import numpy as np
import pytest
from conftest import REPO, assert_one_line_error, run, run_script

import fineweb


def expected_shards(texts, enc, shard_size):
    """build-nanogpt's layout: the stream of <|endoftext|> + document tokens, cut every shard_size tokens."""
    stream = np.concatenate([np.array([enc.eot_token] + enc.encode_ordinary(t), dtype=np.uint16) for t in texts])
    out = []
    for i, start in enumerate(range(0, len(stream), shard_size)):
        buf = io.BytesIO()
        np.save(buf, stream[start:start + shard_size])
        out.append((f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy", buf.getvalue()))
    return out


def shard_files(out_dir):
    """(name, bytes) of every file in out_dir, in shard-index order (the name's last 10 characters)."""
    paths = sorted(glob.glob(os.path.join(out_dir, "*")), key=lambda p: p[-10:])
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


def test_existing_shards_are_kept_unless_overwrite(tmp_path, docs):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "out"
    fineweb.main(["--dataset", str(path), "--out_dir", str(out), "--shard_size", "500"])
    before = shard_files(out)
    proc = run_script("fineweb.py", "--dataset", path, "--out_dir", out, "--shard_size", 100000)
    assert_one_line_error(proc, "already holds", "--overwrite")
    assert shard_files(out) == before
    proc = run_script("fineweb.py", "--dataset", path, "--out_dir", out, "--shard_size", 100000, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert [name for name, _ in shard_files(out)] == ["edufineweb_val_000000.npy"]
    assert "only the val shard was written" in proc.stdout


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
    assert_one_line_error(proc, "--shard_size and --num_proc must be positive")
    assert not os.path.exists(tmp_path / "o") or not os.listdir(tmp_path / "o")
