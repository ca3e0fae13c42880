"""Real training runs on CPU: learning, compile with eval, DDP equivalence, checkpoints, the notebook, bad flags."""

import os
import sys

import nbformat
import pytest
import torch
from conftest import REPO, TINY_MODEL, assert_one_line_error, read_log, run, run_script, write_shards

import train_gpt2


@pytest.fixture(scope="module")
def shakespeare_run(tmp_path_factory, shakespeare_shards, hellaswag_dir):
    """100 steps of a tiny GPT on Tiny Shakespeare with gradient accumulation, eval, HellaSwag and samples."""
    log_dir = str(tmp_path_factory.mktemp("run") / "log")
    proc = run_script("train_gpt2.py", "--data_dir", shakespeare_shards, "--log_dir", log_dir, *TINY_MODEL,
                      "-B", 8, "-T", 64, "--total_batch_size", 1024, "--max_steps", 100, "--warmup_steps", 10,
                      "--max_lr", 3e-3, "--eval_every", 33, "--val_steps", 4, "--hellaswag_limit", 16,
                      "--checkpoint_every", 50)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return log_dir, proc.stdout


def test_training_learns_and_logs_in_build_nanogpt_format(shakespeare_run):
    log_dir, stdout = shakespeare_run
    with open(os.path.join(log_dir, "log.txt")) as f:
        lines = f.read().splitlines()
    log = read_log(os.path.join(log_dir, "log.txt"))
    assert sorted(log["train"]) == list(range(100))
    assert sorted(log["val"]) == sorted(log["hella"]) == [0, 33, 66, 99]
    # the exact line formats build-nanogpt writes
    assert lines[0] == f"0 val {log['val'][0]:.4f}" and lines[1] == f"0 hella {log['hella'][0]:.4f}"
    assert f"0 train {log['train'][0]:.6f}" in lines
    assert abs(log["val"][0] - 10.83) < 0.1  # ln(50257): the untrained model guesses uniformly
    assert log["val"][99] < log["val"][0] - 3.5
    assert "accumulation steps" in stdout and " x 2 accumulation" in stdout
    assert stdout.count("sample 0: Hello, I'm a language model,") == 3  # not at step 0
    for field in ("| loss ", "| lr ", "| norm ", "| dt ", "| tok/sec ", "| mfu "):
        assert field in stdout


def test_checkpoints_hold_model_config_step_and_val_loss(shakespeare_run):
    log_dir, _ = shakespeare_run
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00050.pt", "model_00099.pt", "train_gpt2.lock"]
    ckpt = torch.load(os.path.join(log_dir, "model_00099.pt"), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 99 and ckpt["config"] == dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2,
                                                         n_embd=64)
    assert ckpt["val_loss"] == pytest.approx(read_log(os.path.join(log_dir, "log.txt"))["val"][99], abs=1e-4)
    model = train_gpt2.GPT.from_pretrained(os.path.join(log_dir, "model_00099.pt"))
    assert torch.equal(model.lm_head.weight, ckpt["model"]["lm_head.weight"])


def test_notebook_runs_on_the_log(shakespeare_run, tmp_path):
    from nbclient import NotebookClient

    log_dir, _ = shakespeare_run
    nb = nbformat.read(os.path.join(REPO, "play.ipynb"), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'log_path = "log/log.txt"' in first.source
    first.source = first.source.replace('"log/log.txt"', repr(os.path.join(log_dir, "log.txt")))
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    log = read_log(os.path.join(log_dir, "log.txt"))
    assert f"min train loss: {min(log['train'].values()):.4f}" in text
    assert f"min val loss: {min(log['val'].values()):.4f}" in text
    assert f"max HellaSwag acc_norm: {max(log['hella'].values()):.4f}" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_compile_on_runs_eval_and_sampling(shakespeare_shards, hellaswag_dir, tmp_path):
    """build-nanogpt had to turn torch.compile off for HellaSwag and sampling; here they run with it on."""
    proc = run_script("train_gpt2.py", "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "log", *TINY_MODEL,
                      "-B", 4, "-T", 64, "--total_batch_size", 256, "--max_steps", 3, "--warmup_steps", 1,
                      "--eval_every", 2, "--val_steps", 2, "--hellaswag_limit", 8, "--compile")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "compile True" in proc.stdout
    assert proc.stdout.count("HellaSwag accuracy: ") == 2 and "sample 3: Hello, I'm a language model," in proc.stdout
    ckpt = torch.load(tmp_path / "log" / "model_00002.pt", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])


def tiny_ddp_args(data_dir, log_dir, val_steps):
    return ["--data_dir", data_dir, "--log_dir", log_dir, *TINY_MODEL, "-B", 2, "-T", 32,
            "--total_batch_size", 256, "--max_steps", 8, "--warmup_steps", 2, "--max_lr", 1e-3,
            "--eval_every", 3, "--val_steps", val_steps, "--hellaswag_limit", 10, "--no-sample"]


def test_two_process_torchrun_equals_one_process_with_double_accumulation(tmp_path, hellaswag_dir):
    """2 ranks x 2 micro-steps and 1 rank x 4 micro-steps see the same tokens and take the same steps;
    HellaSwag split over 2 ranks sums to the same counts."""
    data = str(tmp_path / "data")
    # lengths of whole steps (+1 target token), so shard ends fall alike for both; 8 steps cross every shard end
    write_shards(data, [5 * 128 + 1, 3 * 128 + 1, 4 * 128 + 1])
    write_shards(data, [4 * 128 + 1], split="val", first_index=0)
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train_gpt2.py"), *map(str, tiny_ddp_args(data, tmp_path / "ddp", 2))])
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    assert "processes 2" in ddp.stdout and "x 2 processes x 2 accumulation steps" in ddp.stdout
    # --val_steps counts batches per process: 2 ranks x 2 batches are the same val tokens as 1 x 4
    single = run_script("train_gpt2.py", *tiny_ddp_args(data, tmp_path / "single", 4))
    assert single.returncode == 0, single.stderr[-3000:]
    assert "x 1 processes x 4 accumulation steps" in single.stdout

    a, b = read_log(tmp_path / "ddp" / "log.txt"), read_log(tmp_path / "single" / "log.txt")
    assert sorted(a["train"]) == sorted(b["train"]) == list(range(8))
    assert sorted(a["val"]) == sorted(b["val"]) == sorted(a["hella"]) == [0, 3, 6, 7]
    assert "HellaSwag accuracy: " in ddp.stdout and "/10=" in ddp.stdout
    for kind in ("train", "val", "hella"):
        for step, value in b[kind].items():
            assert a[kind][step] == pytest.approx(value, abs=2e-5), (kind, step)
    assert b["train"][7] < b["train"][0]  # it did train


def run_main(*argv):
    """train_gpt2.main in this process; returns the one-line message it exits with."""
    with pytest.raises(SystemExit) as e:
        train_gpt2.main([str(a) for a in argv])
    return str(e.value)


def test_bad_inputs_give_one_line_errors(tmp_path, shakespeare_shards, capsys):
    base = ["--data_dir", shakespeare_shards, "--log_dir", tmp_path / "log", *TINY_MODEL, "-B", 2, "-T", 32,
            "--no-hellaswag", "--no-sample", "--max_steps", 2, "--warmup_steps", 1]
    assert "does not exist; run `python fineweb.py`" in run_main(*base, "--data_dir", tmp_path / "nowhere")
    msg = run_main(*base, "--total_batch_size", 100)
    assert "--total_batch_size 100 is not a multiple of B*T*processes = 2*32*1 = 64" in msg
    assert "sees no CUDA GPU" in run_main(*base, "--device", "cuda")
    assert "is not one of cuda, mps, cpu" in run_main(*base, "--device", "tpu")
    run_main(*base, "-T", 128)  # argparse: usage and the reason on stderr
    assert "-T/--seq_len 128 is longer than --block_size 64" in capsys.readouterr().err
    run_main(*base, "--warmup_steps", 5)
    assert "--warmup_steps 5 must be below --max_steps 2" in capsys.readouterr().err

    # an existing run is never overwritten by accident
    os.makedirs(tmp_path / "log")
    (tmp_path / "log" / "log.txt").write_text("0 train 10.0\n")
    (tmp_path / "log" / "model_05000.pt").write_bytes(b"precious")
    msg = run_main(*base, "--resume", "none")
    assert "already holds a run (log.txt, model_05000.pt)" in msg and "--overwrite" in msg
    msg = run_main(*base)  # --resume auto: the only checkpoint is unreadable
    assert "no readable checkpoint among the 1 in" in msg and "--resume none --overwrite" in msg
    assert (tmp_path / "log" / "model_05000.pt").read_bytes() == b"precious"
    assert (tmp_path / "log" / "log.txt").read_text() == "0 train 10.0\n"


def test_flag_values_are_checked_before_anything_is_written(tmp_path, shakespeare_shards, capsys):
    import sample

    base = ["--data_dir", shakespeare_shards, "--log_dir", tmp_path / "log", *TINY_MODEL, "-T", 32, "--no-hellaswag"]
    bad = {("--max_lr", "nan"): "expected a finite number, got 'nan'",
           ("--max_lr", "inf"): "expected a finite number, got 'inf'",
           ("--min_lr_ratio", "nan"): "expected a finite number",
           ("--save_every_minutes", "inf"): "expected a finite number",
           ("--grad_clip", "-1"): "--grad_clip positive",
           ("--weight_decay", "-0.1"): "--weight_decay must be >= 0",
           ("--seed", "-1"): "--seed must be >= 0",
           ("--n_head", "3"): "--n_embd 64 must be a multiple of --n_head 3"}
    for flag, reason in bad.items():
        assert run_main(*base, *flag) == "2", flag  # argparse's exit status
        assert reason in capsys.readouterr().err.strip().splitlines()[-1], flag
    assert not os.path.exists(tmp_path / "log")
    for flag, reason in {("--temperature", "nan"): "expected a finite number",
                         ("--prompt", ""): "--prompt is empty"}.items():
        with pytest.raises(SystemExit) as e:
            sample.main(["-m", str(tmp_path / "model.pt"), *flag])
        assert e.value.code == 2 and reason in capsys.readouterr().err.strip().splitlines()[-1], flag


def test_missing_hellaswag_offline_and_corrupt_shard_in_a_real_process(tmp_path, shakespeare_shards, enc):
    base = ["--data_dir", shakespeare_shards, "--log_dir", tmp_path / "log", *TINY_MODEL, "-B", 2, "-T", 32]
    # the proxy makes every request fail at once, with or without a network
    proc = run_script("train_gpt2.py", *base, env={"HELLASWAG_CACHE_DIR": str(tmp_path / "hs"),
                                                   "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert_one_line_error(proc, "could not download https://", str(tmp_path / "hs" / "hellaswag_val.jsonl"),
                          "--no-hellaswag")
    assert not os.path.exists(tmp_path / "log")  # failed before touching the log dir

    os.makedirs(tmp_path / "bad")
    for name in os.listdir(shakespeare_shards):
        os.symlink(os.path.join(shakespeare_shards, name), tmp_path / "bad" / name)
    (tmp_path / "bad" / "edufineweb_train_000009.npy").write_bytes(b"\x93NUMPY garbage")
    proc = run_script("train_gpt2.py", *base, "--data_dir", tmp_path / "bad", "--no-hellaswag")
    assert_one_line_error(proc, "edufineweb_train_000009.npy is unreadable", "rerun `python fineweb.py`")
