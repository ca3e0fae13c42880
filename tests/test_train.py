"""Real training runs on CPU: learning, compile with eval, DDP equivalence, checkpoints, the notebook, bad flags."""

import os
import re
import shutil
import socket
import subprocess
import sys

import nbformat
import pytest
import torch
from conftest import REPO, TINY_MODEL, assert_one_line_error, main_error, main_output, read_log, run, run_script, \
    write_shards

import train_gpt2


@pytest.fixture(scope="module")
def shakespeare_run(build_once, shakespeare_shards, hellaswag_dir):
    """40 steps of a tiny GPT on Tiny Shakespeare with gradient accumulation, eval, HellaSwag and samples: (log
    dir, stdout), made once in the test run. Read it; copy it to change it."""
    def make(root):
        log_dir = str(root / "log")
        proc = run_script("train_gpt2.py", "--data_dir", shakespeare_shards, "--log_dir", log_dir, *TINY_MODEL,
                          "-B", 8, "-T", 64, "--total_batch_size", 1024, "--max_steps", 40, "--warmup_steps", 5,
                          "--max_lr", 3e-3, "--eval_every", 13, "--val_steps", 4, "--hellaswag_limit", 16,
                          "--checkpoint_every", 20)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return log_dir, proc.stdout

    return tuple(build_once("shakespeare_run", make))


@pytest.mark.slow
def test_training_learns_and_logs_in_build_nanogpt_format(shakespeare_run):
    log_dir, stdout = shakespeare_run
    with open(os.path.join(log_dir, "log.txt")) as f:
        lines = f.read().splitlines()
    log = read_log(os.path.join(log_dir, "log.txt"))
    assert sorted(log["train"]) == list(range(40))
    assert sorted(log["val"]) == sorted(log["hella"]) == [0, 13, 26, 39]
    # the exact line formats build-nanogpt writes
    assert lines[0] == f"0 val {log['val'][0]:.4f}" and lines[1] == f"0 hella {log['hella'][0]:.4f}"
    assert f"0 train {log['train'][0]:.6f}" in lines
    assert abs(log["val"][0] - 10.83) < 0.1  # ln(50257): the untrained model guesses uniformly
    assert log["val"][39] < log["val"][0] - 3.5
    assert "accumulation steps" in stdout and " x 2 accumulation" in stdout
    assert stdout.count("sample 0: Hello, I'm a language model,") == 3  # not at step 0
    for field in ("| loss ", "| lr ", "| norm ", "| dt ", "| tok/sec ", "| mfu "):
        assert field in stdout


@pytest.mark.slow
def test_checkpoints_hold_model_config_step_and_val_loss(shakespeare_run):
    log_dir, _ = shakespeare_run
    assert sorted(os.listdir(log_dir)) == ["log.txt", "model_00020.pt", "model_00039.pt", "train_gpt2.lock"]
    ckpt = torch.load(os.path.join(log_dir, "model_00039.pt"), map_location="cpu", weights_only=True)
    assert ckpt["step"] == 39 and ckpt["config"] == dict(block_size=64, vocab_size=50304, n_layer=2, n_head=2,
                                                         n_embd=64, arch="gpt2", untie_head=False, bias=False,
                                                         rotary="full", attn_scale=0.0, embed_norm=False,
                                                         logit_softcap=0.0)
    assert ckpt["val_loss"] == pytest.approx(read_log(os.path.join(log_dir, "log.txt"))["val"][39], abs=1e-4)
    model = train_gpt2.GPT.from_pretrained(os.path.join(log_dir, "model_00039.pt"))
    assert torch.equal(model.lm_head.weight, ckpt["model"]["lm_head.weight"])


@pytest.mark.slow
def test_notebook_runs_on_the_log(shakespeare_run, tmp_path):
    from nbclient import NotebookClient

    log_dir = str(shutil.copytree(shakespeare_run[0], tmp_path / "log"))  # the notebook saves its PNG there
    with open(os.path.join(log_dir, "log.txt"), "a") as f:  # as --core_every logs them
        f.write("13 core 0.0123\n39 core 0.0456\n")
    nb = nbformat.read(os.path.join(REPO, "play.ipynb"), as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'log_dir = "log"' in first.source
    first.source = first.source.replace('"log"', repr(log_dir))
    # run from the repository, as a user opens it; it writes only the PNG, into the run's folder
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    log = read_log(os.path.join(log_dir, "log.txt"))
    assert f"min train loss: {min(log['train'].values()):.4f}" in text
    assert f"min val loss: {min(log['val'].values()):.4f}" in text
    assert f"max HellaSwag acc_norm: {max(log['hella'].values()):.4f}" in text
    assert "max CORE: 0.0456" in text
    assert "OpenAI's GPT-2 124M: HellaSwag acc_norm 0.2945, FineWeb val loss 3.4250, CORE 0.1139; GPT-3 Small, " \
           "125M: " in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
    png = os.path.join(log_dir, "curves.png")
    assert f"saved {png}" in text and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_plot_labels_the_run_by_its_own_size_and_hellaswag_sample(shakespeare_run, tmp_path):
    import plot_log

    log_dir, _ = shakespeare_run
    fig, path = plot_log.plot(log_dir, out=str(tmp_path / "curves.png"))
    ax_loss, ax_hella = fig.axes
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    size = sum({p.data_ptr(): p.numel() for p in train_gpt2.GPT.from_pretrained(
        os.path.join(log_dir, "model_00039.pt")).state_dict().values()}.values())
    assert f"this run ({size / 1e6:.0f}M parameters): train loss" in labels
    assert not any("124M: train" in x for x in labels)
    # the tests' HellaSwag file is a stand-in: the plot says so
    assert f"this run ({size / 1e6:.0f}M parameters), 16 examples per point (a stand-in val file, not comparable " \
           "to GPT-2's), +-2 s.e." in labels
    assert "chance (1 in 4)" in labels
    # Tiny Shakespeare is not where GPT-2's val loss was measured: the plot says so
    assert "OpenAI GPT-2 124M: val loss (FineWeb-Edu; this run's val data is other text)" in labels
    assert "OpenAI GPT-3 Small, 125M (paper)" in labels
    assert ax_loss.get_yscale() == "linear" and open(path, "rb").read(4) == b"\x89PNG"
    # each legend lies under its plot (it covered GPT-2's line), and within the saved image (it spilled past it)
    renderer = fig.canvas.get_renderer()
    saved = fig.get_tightbbox(renderer)
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.y1 <= ax.get_window_extent(renderer).y0
        assert saved.x0 * fig.dpi <= legend.x0 and legend.x1 <= saved.x1 * fig.dpi
    # build-nanogpt's logs: no checkpoint
    assert plot_log.describe_run(plot_log.newest_checkpoint(str(tmp_path))) == ("this run", None, None)


def tiny_ddp_args(data_dir, log_dir, val_steps):
    return ["--data_dir", data_dir, "--log_dir", log_dir, *TINY_MODEL, "-B", 2, "-T", 32,
            "--total_batch_size", 256, "--max_steps", 8, "--warmup_steps", 2, "--max_lr", 1e-3,
            "--eval_every", 3, "--val_steps", val_steps, "--hellaswag_limit", 10, "--no-sample"]


@pytest.mark.slow
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
    single = main_output(train_gpt2.main, *tiny_ddp_args(data, tmp_path / "single", 4))  # in this process
    assert "x 1 processes x 4 accumulation steps" in single

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
    missing = run_main(*base, "--data_dir", tmp_path / "nowhere")
    assert "does not exist; download FineWeb-Edu's GPT-2 tokens with `python fineweb.py --pretokenized" in missing
    assert "or tokenize it here with `python fineweb.py`" in missing
    msg = run_main(*base, "--total_batch_size", 100)
    assert "--total_batch_size 100 is not a multiple of B*T*processes = 2*32*1 = 64" in msg
    assert "sees no CUDA GPU" in run_main(*base, "--device", "cuda")
    assert "is not one of cuda, mps, cpu" in run_main(*base, "--device", "tpu")
    graphs = run_main(*base, "--compile", "--compile_mode", "reduce-overhead", "--total_batch_size", 128)
    assert "--compile_mode reduce-overhead captures CUDA graphs" in graphs and "-B 2 needs 2 of them" in graphs
    assert "max-autotune-no-cudagraphs" in graphs and not (tmp_path / "log").exists()
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
           ("--grad_clip", "-1"): "--grad_clip >= 0 (0: no clipping",
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


@pytest.mark.slow
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


@pytest.mark.parametrize("script", ["train_gpt2.py", "core.py", "hellaswag.py"])
def test_an_exit_message_is_one_write_so_ranks_never_splice_it(script, tmp_path):
    """Python writes sys.exit("...")'s message and its newline apart; unbuffered, two ranks sharing torchrun's stderr
    once printed "...to resumetrain_gpt2.py: error: ..." (a CI run of the full-disk FSDP test). The scripts that run
    under torchrun write the line whole. A SOCK_SEQPACKET socket as stderr keeps each write() a message of its own."""
    argv = {"train_gpt2.py": ["--data_dir", tmp_path / "none", "-B", 1, "-T", 32, "--total_batch_size", 32],
            "core.py": ["-m", tmp_path / "none.pt"], "hellaswag.py": ["-m", tmp_path / "none.pt"]}[script]
    env = dict(os.environ, PYTHONUNBUFFERED="1", CORE_CACHE_DIR=str(tmp_path), HELLASWAG_CACHE_DIR=str(tmp_path))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        proc = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, argv)], stderr=theirs, env=env,
                              stdout=subprocess.DEVNULL, timeout=120)
        theirs.close()
        writes = list(iter(lambda: ours.recv(1 << 16).decode(), ""))
    assert proc.returncode == 1
    assert writes and writes[-1].startswith(f"{script}: error: ") and writes[-1].count("\n") == 1 \
        and writes[-1].endswith("\n"), writes[-3:]


@pytest.mark.parametrize("script, argv, needle", [
    ("train_gpt2", ["--max_steps", "0"], "--max_steps must be positive"),
    ("train_gpt2", ["--arch", "gpt3"], "invalid choice: 'gpt3'"),
    ("train_gpt2", ["--core_max_per_task", "0"], "--core_max_per_task positive"),
    ("train_gpt2", ["--val_tokens", "-64"], "--val_tokens -64 must not be negative"),
    ("core", ["--batch_tokens", "-1"], "--batch_tokens must be >= 0"),
    ("fineweb", ["--num_proc", "x"], "invalid int value: 'x'"),
    ("hellaswag", ["--split", "test"], "invalid choice: 'test'"),
    ("sample", ["--num_samples", "0"], "must be positive"),
    ("export", [], "the following arguments are required"),
    ("plot_log", ["a", "b"], "unrecognized arguments: b"),
])
def test_flag_errors_are_one_line_pointing_at_help(script, argv, needle, capsys):
    """(plot_log.py used to take --help, or anything, as the name of a folder.)"""
    module = __import__(script)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and err.endswith("(see --help)\n"), err


@pytest.mark.parametrize("script", ["train_gpt2", "fineweb", "hellaswag", "sample", "export", "plot_log", "app"])
def test_help_shows_one_default_per_flag(script, capsys):
    with pytest.raises(SystemExit):
        __import__(script).main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # one line: wrapped help joined again
    assert "(default: None)" not in out
    assert not re.search(r"\(default[^()]*\) \(default", out), out


@pytest.mark.slow
def test_first_try_preset_reports_eta_and_summary_then_a_rerun_is_complete(shakespeare_shards, hellaswag_dir,
                                                                           tmp_path):
    args = ["--first_try", "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "log", "--max_steps", 4,
            "--warmup_steps", 1, "--eval_every", 3, "--hellaswag_limit", 8]
    proc = run_script("train_gpt2.py", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model: " in proc.stdout and "total batch 2,048 tokens = 16 x 128" in proc.stdout  # the preset's sizes
    step_lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 4 and all(re.search(r"\| elapsed \d+s \| eta \d+s$", line) for line in step_lines[1:])
    assert step_lines[0].endswith(" | eta -")  # the first step compiles and warms up: no estimate from it
    samples = [line for line in proc.stdout.splitlines() if line.startswith("sample ")]
    assert len(samples) == 4 and all("Hello, I'm a language model," in s for s in samples)
    # a sample's newlines are escaped: every line of the output is one of the run's own kinds of line
    kinds = ("device ", "recipe ", "model: ", "total batch", "data", "train shards", "MFU ", "validation loss",
             "validation bits per byte", "HellaSwag", "step ", "sample ", "saved ", "done: ", "note: ")
    assert all(line.startswith(kinds) for line in proc.stdout.splitlines()), proc.stdout
    summary = proc.stdout.strip().splitlines()[-1]
    log = read_log(tmp_path / "log" / "log.txt")
    assert summary.startswith("done: 4 steps (8,192 tokens), 4 of them in this process, in ")
    assert f"model {tmp_path / 'log' / 'model_00003.pt'}: after 3 updates (6,144 tokens)" in summary
    assert f"val loss {log['val'][3]:.4f} | HellaSwag {log['hella'][3]:.4f}" in summary
    assert torch.load(tmp_path / "log" / "model_00003.pt", weights_only=True)["step"] == 3  # what it records
    before = open(tmp_path / "log" / "log.txt").read()
    again = main_output(train_gpt2.main, *args)  # in this process
    assert "holds a complete run" in again and "nothing to do" in again
    assert open(tmp_path / "log" / "log.txt").read() == before


def wandb_history(run_dir):
    """The rows a W&B run logged, read back from its offline .wandb file (LevelDB's log format: a 7-byte
    file header, then records of crc32, length, type in 32 KiB blocks), parsed with wandb's own protobuf."""
    import json

    from wandb.proto import wandb_internal_pb2

    (path,) = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.endswith(".wandb")]
    data, block = open(path, "rb").read(), 32768
    pos, pending, rows, config = 7, b"", [], {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            elif record.WhichOneof("record_type") == "run":
                config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    return rows, config


@pytest.mark.slow
def test_wandb_offline_logs_what_log_txt_logs_and_a_resume_goes_on_in_the_same_run(shakespeare_shards, hellaswag_dir,
                                                                                   core_bundle, tmp_path):
    pytest.importorskip("wandb")
    args = ["--data_dir", shakespeare_shards, "--log_dir", tmp_path / "myrun", *TINY_MODEL, "-B", 4, "-T", 32,
            "--total_batch_size", 256, "--max_steps", 4, "--warmup_steps", 1, "--eval_every", 3, "--val_steps", 2,
            "--hellaswag_limit", 4, "--no-sample", "--wandb", "--wandb_project", "tests", "--peak_tflops", 1,
            "--core_every", 3, "--core_max_per_task", 4, "--core_bundle", core_bundle]
    proc = run_script("train_gpt2.py", *args, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                                                   "WANDB_SILENT": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [os.path.join(tmp_path, "wandb", n) for n in os.listdir(tmp_path / "wandb")
                  if n.startswith("offline-run")]
    rows, config = wandb_history(run_dir)
    log = read_log(tmp_path / "myrun" / "log.txt")
    by_step = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == [0, 1, 2, 3]
    for step, row in by_step.items():
        assert f"{row['train/loss']:.6f}" == f"{log['train'][step]:.6f}"
        assert {"lr", "norm", "tok_per_sec", "mfu"} <= set(row) and row["lr"] > 0
    for step in (0, 3):
        assert f"{by_step[step]['val/loss']:.4f}" == f"{log['val'][step]:.4f}"
        assert f"{by_step[step]['hellaswag/acc_norm']:.4f}" == f"{log['hella'][step]:.4f}"
        assert f"validation bits per byte: {by_step[step]['val/bpb']:.4f}" in proc.stdout
    assert f"{by_step[3]['core/metric']:.4f}" == f"{log['core'][3]:.4f}" and list(log["core"]) == [3]
    assert config["max_steps"] == 4 and config["wandb_project"] == "tests"
    # trained on: the resumed run logs into the same W&B run (its id is in the checkpoint)
    args[args.index("--max_steps") + 1] = 6
    proc = run_script("train_gpt2.py", *args, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
                                                   "WANDB_SILENT": "true"})
    assert proc.returncode == 0 and "resuming at step 3" in proc.stdout, proc.stderr[-3000:]
    runs = sorted(n for n in os.listdir(tmp_path / "wandb") if n.startswith("offline-run"))
    assert len(runs) == 2 and runs[0].rsplit("-", 1)[1] == runs[1].rsplit("-", 1)[1], runs
    (resumed,) = [n for n in runs if n != os.path.basename(run_dir)]
    rows, _ = wandb_history(tmp_path / "wandb" / resumed)
    log = read_log(tmp_path / "myrun" / "log.txt")
    assert sorted({row["_step"] for row in rows}) == [3, 4, 5]
    assert all(f"{row['train/loss']:.6f}" == f"{log['train'][row['_step']]:.6f}" for row in rows if "train/loss" in row)


def test_wandb_missing_is_one_line_naming_the_install(shakespeare_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed: `import wandb` fails
    msg = main_error(train_gpt2.main, "--data_dir", shakespeare_shards, "--log_dir", tmp_path / "log", *TINY_MODEL,
                     "-B", 2, "-T", 32, "--wandb", "--no-hellaswag")
    assert "--wandb needs Weights & Biases" in msg and "pip install wandb" in msg
    assert not os.path.exists(tmp_path / "log")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
@pytest.mark.parametrize("script, argv", [("sample.py", ["-m", "gpt2"]), ("hellaswag.py", ["-m", "gpt2"]),
                                          ("app.py", ["-m", "gpt2"])])  # train_gpt2.py's: test_bad_inputs_give
def test_device_cuda_without_cuda_is_one_line(script, argv):
    proc = run_script(script, "--device", "cuda", *argv)
    assert_one_line_error(proc, "--device cuda was asked for but torch sees no CUDA GPU")


@pytest.mark.slow
def test_an_offline_first_try_names_every_missing_download_in_one_message(tmp_path, shakespeare_shards):
    """No network (every request sent to a dead local proxy) and empty caches: each step of the first try says
    at once all it lacks, with where each comes from and where it goes."""
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken"), "HELLASWAG_CACHE_DIR": str(tmp_path / "hs")}
    os.makedirs(tmp_path / "tiktoken")
    data = run_script("fineweb.py", "--dataset", "shakespeare", "--out_dir", tmp_path / "ts", env=offline)
    last = assert_one_line_error(data, "could not load the GPT-2 tokenizer", "TIKTOKEN_CACHE_DIR",
                                 "could not download https://", "input.txt")
    assert "openaipublic" in last and not os.path.exists(tmp_path / "ts")
    train = run_script("train_gpt2.py", "--first_try", "--data_dir", shakespeare_shards, "--log_dir",
                       tmp_path / "log", env=offline)
    assert_one_line_error(train, "could not load the GPT-2 tokenizer", "--no-sample --no-hellaswag",
                                 "hellaswag_val.jsonl", "HELLASWAG_CACHE_DIR", "--no-hellaswag")
    assert not os.path.exists(tmp_path / "log")


def test_plot_draws_the_baselines_of_the_runs_own_gpt2_size_and_val_data(tmp_path):
    """A gpt2-medium run on FineWeb's shards (llm.c's names) is drawn against GPT-2 355M's FineWeb val loss
    and HellaSwag, and GPT-3 Medium's; with no note, since its val data is the baseline's."""
    import plot_log

    (tmp_path / "log.txt").write_text("0 train 10.9\n0 val 10.9\n0 hella 0.25\n10 train 6.0\n10 val 6.1\n")
    ckpt = {"model": {"w": torch.zeros(3)}, "config": {"n_layer": 24, "n_embd": 1024, "n_head": 16}, "step": 10,
            "args": {"hellaswag": True}, "data_identity": {"val": {"fineweb_val_000000.bin": "x"}}}
    torch.save(ckpt, tmp_path / "model_00010.pt")
    fig, _ = plot_log.plot(str(tmp_path), out=str(tmp_path / "curves.png"))
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert "OpenAI GPT-2 355M: val loss" in labels and "OpenAI GPT-2 355M (10,042 examples)" in labels
    assert "OpenAI GPT-3 Medium, 350M (paper)" in labels
    lines = {line.get_label(): line.get_ydata()[0] for ax in fig.axes for line in ax.get_lines()}
    assert lines["OpenAI GPT-2 355M: val loss"] == 3.083089 and lines["OpenAI GPT-2 355M (10,042 examples)"] == 0.375224
