"""The speed harness: benchmark mode, the options the ladder switches, and the ladder itself (not timings)."""

import json
import os
import re
import sys

import pytest
from conftest import REPO, TINY_MODEL, read_log, run, run_script

BENCH = ["--benchmark", *TINY_MODEL, "-B", 4, "-T", 64, "--total_batch_size", 512, "--warmup_steps", 2,
         "--max_lr", 3e-3]


def losses(stdout):
    return [float(m) for m in re.findall(r"^step +\d+ \| loss ([\d.]+)", stdout, flags=re.M)]


def test_benchmark_mode_summarises_and_writes_nothing(tmp_path):
    proc = run_script("train_gpt2.py", *BENCH, "--max_steps", 6, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.listdir(tmp_path) == []  # no log dir, no checkpoint, no data needed
    assert "data: random tokens (--synthetic)" in proc.stdout and "validation" not in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("BENCHMARK "))
    assert set(result) == {"ms_per_step", "tokens_per_sec", "mfu", "peak_memory_gib", "steps_measured",
                           "warmup_steps"}
    assert result["steps_measured"] == 5 and result["warmup_steps"] == 1
    assert result["ms_per_step"] > 0 and result["tokens_per_sec"] > 0 and result["peak_memory_gib"] > 0
    assert re.search(r"benchmark: median [\d.]+ ms/step over 5 steps after 1 warm-up \| [\d,]+ tok/s \| MFU",
                     proc.stdout)
    assert len(losses(proc.stdout)) == 6


@pytest.mark.parametrize("variant", [["--attention", "manual"], ["--fused_adamw"]])
def test_same_math_gives_the_same_loss_curve(variant, shakespeare_shards, tmp_path):
    """Written-out attention and the fused AdamW kernel are speed choices: on real text the losses must not move."""
    common = ["--data_dir", shakespeare_shards, *TINY_MODEL, "-B", 4, "-T", 64, "--total_batch_size", 512,
              "--max_steps", 12, "--warmup_steps", 2, "--max_lr", 3e-3, "--eval_every", 6, "--val_steps", 2,
              "--no-hellaswag", "--no-sample"]
    base = run_script("train_gpt2.py", *common, "--log_dir", tmp_path / "base")
    other = run_script("train_gpt2.py", *common, "--log_dir", tmp_path / "other", *variant)
    assert base.returncode == other.returncode == 0, other.stderr[-3000:]
    assert ("attention manual" in other.stdout) or ("fused AdamW True" in other.stdout)
    a, b = read_log(tmp_path / "base" / "log.txt"), read_log(tmp_path / "other" / "log.txt")
    assert a["train"][11] < a["train"][0] - 1.0  # it learns
    for kind in ("train", "val"):
        assert sorted(a[kind]) == sorted(b[kind])
        for step, value in a[kind].items():
            assert b[kind][step] == pytest.approx(value, abs=2e-5), (kind, step)


def test_ladder_runs_every_rung():
    proc = run([sys.executable, os.path.join(REPO, "benchmarks", "ladder.py"), "--size", "tiny", "--device", "cpu",
                "--steps", "3", "-B", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "rung" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["fp32", "+ TF32", "+ bf16 autocast", "+ torch.compile", "+ flash attention (SDPA)",
                     "+ vocab 50304", "+ fused AdamW"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert len(cells) == 6 and "failed" not in row, row
        assert float(cells[1]) > 0 and int(cells[2].replace(",", "")) > 0 and cells[5].endswith("x")
    assert rows[0].split("|")[6].strip() == "1.00x"
