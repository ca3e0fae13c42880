"""The speed harness: benchmark mode and the options the ladder switches (not timings). The ladder itself runs in
tests/test_gpu_commands.py, as `benchmarks/gpu.sh speed` runs it."""

import json
import os
import platform
import re
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend
from conftest import REPO, TINY_MODEL, main_output, read_log, run, run_script

import train_gpt2
from machinery import speed

pytestmark = pytest.mark.slow  # real training processes: left out of `pytest -m "not slow"`

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
                           "warmup_steps", "state_gib"}
    assert 0 < result["state_gib"] < result["peak_memory_gib"]  # weights, gradients, AdamW's moments: a part of it
    assert result["steps_measured"] == 5 and result["warmup_steps"] == 1
    assert result["ms_per_step"] > 0 and result["tokens_per_sec"] > 0 and result["peak_memory_gib"] > 0
    assert re.search(r"benchmark: median [\d.]+ ms/step over 5 steps after 1 warm-up \| [\d,]+ tok/s \| MFU",
                     proc.stdout)
    assert len(losses(proc.stdout)) == 6
    # random tokens come from the run's own vocabulary: a 64-token model trains (it indexed past its embedding)
    small = run_script("train_gpt2.py", "--benchmark", "--vocab_size", 64, "--n_layer", 1, "--n_head", 2,
                       "--n_embd", 16, "--block_size", 16, "-B", 2, "-T", 16, "--total_batch_size", 32,
                       "--max_steps", 3, "--warmup_steps", 1, cwd=tmp_path)
    assert small.returncode == 0 and len(losses(small.stdout)) == 3, small.stderr[-2000:]


def same_math_run(data_dir, log_dir, *variant):
    """In this process: each run sets its own kernels (an --sdpa_backend choice is undone by the next run's)."""
    stdout = main_output(train_gpt2.main, "--data_dir", data_dir, "--log_dir", log_dir, *TINY_MODEL, "-B", 4,
                         "-T", 64, "--total_batch_size", 512, "--max_steps", 12, "--warmup_steps", 2, "--max_lr",
                         3e-3, "--eval_every", 6, "--val_steps", 2, "--no-hellaswag", "--no-sample", *variant)
    return stdout, read_log(os.path.join(log_dir, "log.txt"))


@pytest.fixture(scope="module")
def base_run(shakespeare_shards, build_once):
    """The defaults on CPU: SDPA (its flash kernel), per-tensor AdamW, whole-batch loss, prefetching."""
    def make(root):
        stdout, _ = same_math_run(shakespeare_shards, str(root / "log"))
        return stdout, str(root / "log" / "log.txt")

    stdout, log = build_once("speed_base_run", make)
    return stdout, read_log(log)


@pytest.mark.parametrize("variant, banner", [
    (["--attention", "manual"], "attention manual"),
    (["--fused_adamw"], "fused AdamW True"),
    (["--chunked_ce", 100], "chunked CE 100"),  # 256-row micro-batches: chunks of 100, 100, 56
    (["--sdpa_backend", "math"], "attention sdpa (math)"),
    (["--no-prefetch"], "prefetch False"),
    (["--no-keep_freed_memory"], "keep freed memory False"),
])
def test_same_math_gives_the_same_loss_curve(variant, banner, base_run, shakespeare_shards, tmp_path):
    """Speed choices (written-out attention, fused AdamW, the loss in chunks, another attention kernel, no
    prefetching, glibc's default malloc): on real text the train and val losses must not move."""
    stdout, b = same_math_run(shakespeare_shards, str(tmp_path / "log"), *map(str, variant))
    assert banner in stdout
    a = base_run[1]
    assert a["train"][11] < a["train"][0] - 1.0  # it learns
    for kind in ("train", "val"):
        assert sorted(a[kind]) == sorted(b[kind])
        for step, value in a[kind].items():
            assert b[kind][step] == pytest.approx(value, abs=2e-5), (kind, step)


RSS_AFTER_A_FREE = """
import os, torch
from machinery import speed
applied = speed.keep_freed_cpu_memory()
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = rss()
x = torch.ones(50_000_000)  # 200 MB, written
del x
print(applied, (rss() - before) // 10**6)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_stays_for_the_next_step_unless_the_user_set_malloc(base_run):
    """What --keep_freed_memory (on by default on CPU) does: a freed 200 MB block stays in the process, where
    glibc alone would unmap it; and a user's own MALLOC_* or preloaded allocator is left alone."""
    assert "keep freed memory True" in base_run[0]
    kept = run([sys.executable, "-c", RSS_AFTER_A_FREE], cwd=REPO)
    default = run([sys.executable, "-c", RSS_AFTER_A_FREE], cwd=REPO, env={"MALLOC_ARENA_MAX": "4"})
    assert kept.returncode == default.returncode == 0, kept.stderr + default.stderr
    applied, grown = kept.stdout.split()
    assert applied == "True" and int(grown) >= 190, kept.stdout
    applied, grown = default.stdout.split()
    assert applied == "False" and int(grown) < 50, default.stdout


@pytest.mark.parametrize("name, kept", [("flash", {"flash", "math"}), ("math", {"math"}),
                                        ("cudnn", {"cudnn", "math"}), ("efficient", {"mem_efficient", "math"})])
def test_a_chosen_sdpa_kernel_comes_first_with_math_kept_for_the_calls_it_refuses(name, kept):
    """--sdpa_backend flash (or cudnn) alone would leave the KV cache's masked calls and fp32 without a kernel
    ("No available kernel" at the first evaluation's samples): math stays enabled beside it, but after it in
    torch's priority order, or torch picks math wherever its default order puts math first (cuDNN on many
    builds). The CUDA kernels' switches are torch's global flags, set the same without a GPU; which kernel
    really runs is checked here on CPU for flash and math, on a GPU for all (test_cuda.py)."""
    kinds = ("flash", "mem_efficient", "math", "cudnn")
    order = torch._C._get_sdp_priority_order()
    try:
        speed.select_sdpa_backend(name, "cuda" if name in ("cudnn", "efficient") else "cpu")
        assert {k for k in kinds if getattr(torch.backends.cuda, f"{k}_sdp_enabled")()} == kept
        first = SDPBackend(torch._C._get_sdp_priority_order()[0]).name
        assert first == speed.SDPA_BACKENDS[name], torch._C._get_sdp_priority_order()
        if name in ("flash", "math"):
            assert speed.sdpa_kernel_in_use(2, 64, 32, "cpu", torch.float32) == speed.SDPA_BACKENDS[name]
    finally:
        speed.select_sdpa_backend("auto", "cpu")
    assert all(getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in kinds)
    assert torch._C._get_sdp_priority_order() == order  # auto: torch's defaults again


# two gloo ranks: -B auto's probes, then DDP around the compiled model, as setup_run does
DDP_SPLIT_CHECK = r'''
import contextlib, sys
import torch
import torch.distributed as dist
from torch._dynamo.backends.distributed import DDPOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, sys.argv[1])
from machinery import speed
from train_gpt2 import GPT, GPTConfig

dynamic = []  # one entry per graph DDPOptimizer split: whether its inputs have a symbolic (dynamic) size
split = DDPOptimizer.compile_fn
def recorded(self, gm, example_inputs):
    dynamic.append(any(isinstance(s, torch.SymInt) for a in example_inputs if isinstance(a, torch.Tensor)
                       for s in a.shape) or any(isinstance(a, torch.SymInt) for a in example_inputs))
    return split(self, gm, example_inputs)
DDPOptimizer.compile_fn = recorded
dist.init_process_group("gloo")
torch.manual_seed(0)
raw = GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
model = torch.compile(raw, backend="aot_eager")
B = speed.auto_micro_batch(model, raw, [4, 2], 32, contextlib.nullcontext(), "cpu", ddp=True)
ddp = DDP(model)
for _ in range(2):
    x = torch.randint(0, 128, (B, 32))
    ddp(x, x)[1].backward()
print(f"rank {dist.get_rank()}: B {B}, DDPOptimizer graphs {dynamic}")
dist.destroy_process_group()
'''


def test_after_batch_auto_training_compiles_the_static_ddp_split_graph(tmp_path):
    """-B auto probes the compiled model outside DDP at several sizes; the training graph must not reuse that
    graph (dynamic batch, never split by DDPOptimizer, so no all-reduce overlaps the backward). Without the
    dynamo reset after the probes this prints `DDPOptimizer graphs []`."""
    script = tmp_path / "ddp_split_check.py"
    script.write_text(DDP_SPLIT_CHECK)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                REPO], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: B 4, DDPOptimizer graphs [False]" in proc.stdout, proc.stdout
