"""
Every command meant for a GPU runs here first, on CPU, with only its sizes swapped for tiny ones: the stages of
benchmarks/gpu.sh (GPU_DRY=1), the project's command in ../shared/bench/gpu_side_by_side.sh, and the GPU
commands the README, docs/reference.md and benchmarks/README.md show. A GPU lent for a few minutes then
spends them on figures, not on a flag that no longer parses or a file that is not there.
"""

import os
import re
import shlex
import sys

import pytest
from conftest import REPO, SHARED, run

pytestmark = pytest.mark.slow  # whole (tiny) runs, one process or more each

# what the dry runs swap in, last on each command line so that they win: a tiny GPT on CPU
TINY = ["--device", "cpu", "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "64", "-T", "64",
        "-B", "2", "--total_batch_size", "256", "--hellaswag_limit", "4"]


@pytest.fixture(scope="module")
def gpu_data(build_once, enc):
    """`GPU_DRY=1 bash benchmarks/gpu.sh prepare`: .gpu/'s contents from ../shared, in a folder of the test run's
    (made once)."""
    if not os.path.isdir(os.path.join(SHARED, "tinyshakespeare")):
        pytest.skip(f"no {SHARED}/tinyshakespeare")

    def make(root):
        env = dict(GPU_DRY="1", GPU_DATA=str(root / "gpu"), OUT=str(root / "prepare_out"))
        proc = run(["bash", os.path.join(REPO, "benchmarks", "gpu.sh"), "prepare"], env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert sorted(os.listdir(root / "gpu" / "novels"))[-1] == "edufineweb_val_000000.npy"
        return str(root / "gpu")

    return build_once("gpu_data", make)


def dry_stage(gpu_data, out, stage, timeout=540):
    env = dict(GPU_DRY="1", GPU_DATA=gpu_data, OUT=str(out))  # the run's compile cache (conftest), not .gpu/'s
    proc = run(["bash", os.path.join(REPO, "benchmarks", "gpu.sh"), stage], env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, (out / "summary.txt").read_text()


def test_gpu_sh_first_in_dry_mode_runs_every_section_in_order(gpu_data, tmp_path):
    out, summary = dry_stage(gpu_data, tmp_path, "first")
    sections = re.findall(r"^=== (\w+) ", out, flags=re.M)
    assert sections == ["machine", "probe", "preflight", "benchmark", "profile", "tests"], out[-3000:]
    for name in ("probe", "preflight", "benchmark", "profile", "tests"):
        assert (tmp_path / f"{name}.log").stat().st_size > 0, name
    assert "probe: 11 APIs ok, 0 missing" in summary
    assert "preflight passed: every phase ran" in summary
    # the speed line comes right after the steps, before the evaluation (a cut run still has it)
    preflight = out.split("=== preflight")[1]
    assert preflight.index("preflight: speed ") < preflight.index("preflight: evaluation ok")
    assert re.search(r"benchmark \(default recipe, 20 steps\): benchmark: median [\d.]+ ms/step", summary)
    assert re.search(r"^profile: profiled step 3: ", summary, flags=re.M)
    assert "aten::mm" in (tmp_path / "profile.log").read_text()
    assert re.search(r"cuda tests: .* \d+/\d+ tests collected", summary), summary


@pytest.mark.parametrize("stage, wanted", [
    ("speed", ["default (B=64): benchmark: median", "-B auto: benchmark: median", "--chunked_ce 8192: benchmark:",
               "--sdpa_backend cudnn: FAILED", "--compile_mode max-autotune-no-cudagraphs: benchmark: median"]),
    ("recipes", ["recipes: | gpt2 ", "| llama ", "| speedrun ", "| speedrun-simple "]),
    ("memory", ["gpt2-xl -B 4 (DDP): benchmark: median", "gpt2-xl -B 4 --recompute: benchmark: median",
                "gpt2-xl -B 4 --fsdp: benchmark: median", "gpt2-xl -B 4 --fsdp --recompute: benchmark: median"]),
])
def test_gpu_sh_stages_in_dry_mode(gpu_data, tmp_path, stage, wanted):
    """Each later stage's commands, tiny. On CPU the cuDNN kernel is refused in one line (that is the only
    failure a dry run expects), and -B auto is one of the sizes swapped (it needs GPU memory to measure)."""
    out, summary = dry_stage(gpu_data, tmp_path, stage)
    for needle in wanted:
        assert needle in summary, summary
    if stage == "speed":
        assert "--sdpa_backend cudnn needs a CUDA GPU" in (tmp_path / "speed.log").read_text()
        assert_every_rung_ran((tmp_path / "ladder.log").read_text())


def assert_every_rung_ran(ladder):
    """benchmarks/ladder.py's table: each rung's flags ran (compiled from `+ torch.compile` on, in bf16 on CPU)
    and its row has the figures; the CUDA kernels' rungs say they were skipped."""
    rows = [line for line in ladder.splitlines() if line.startswith("| ") and "rung" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert names == ["fp32", "+ TF32", "+ bf16 autocast", "+ torch.compile", "+ flash attention (SDPA)",
                     "+ vocab 50304", "+ fused AdamW", "+ prefetch, pinned copies", "+ chunked cross-entropy",
                     "+ cuDNN attention", "+ compile max-autotune"], ladder
    for row in rows[:-2]:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert len(cells) == 6 and "failed" not in row, row
        assert float(cells[1]) > 0 and int(cells[2].replace(",", "")) > 0 and cells[5].endswith("x")
    assert rows[0].split("|")[6].strip() == "1.00x"
    for row in rows[-2:]:  # the kernels CPUs do not have
        assert row.endswith("| skipped: CUDA only"), row
    assert re.search(r"^'\+ chunked cross-entropy' against build-nanogpt's configuration \('\+ fused AdamW'\): "
                     r"[\d.]+x$", ladder, flags=re.M)


def test_gpu_sh_eval_and_side_in_dry_mode(gpu_data, tmp_path):
    _, summary = dry_stage(gpu_data, tmp_path, "eval")
    assert re.search(r"^eval: .*\d", summary, flags=re.M), summary
    _, summary = dry_stage(gpu_data, tmp_path, "side")
    assert "side by side: skipped in a dry run" in summary


# The GPU commands the docs show, each as it stands there (checked), run with the sizes swapped: torchrun's 8
# processes become 2 gloo ones, a dataset folder the tiny shards, and the run is a few steps. (The docs' other
# GPU commands are run elsewhere: `benchmarks/ladder.py -B 64`'s every rung by the speed stage above, the multi-node
# launch by test_multinode.py, `hellaswag.py -m gpt2`'s scoring by test_hellaswag.py.)
DOCUMENTED = {
    "torchrun --standalone --nproc_per_node=8 train_gpt2.py --data_dir fineweb-edu-10B": ["README.md"],
    "python train_gpt2.py": ["README.md", "docs/reference.md"],
    "torchrun --standalone --nproc_per_node=8 train_gpt2.py --fsdp": ["README.md"],
    "python train_gpt2.py --recipe speedrun-simple --data_dir fineweb-10B": ["README.md"],
    "torchrun --standalone --nproc_per_node=8 train_gpt2.py --recipe speedrun-simple --data_dir fineweb-10B":
        ["README.md"],
    "torchrun --standalone --nproc_per_node=8 train_gpt2.py --recipe speedrun --log_dir log_speedrun": ["README.md"],
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc_per_node=8 --max-restarts 3 train_gpt2.py":
        ["README.md", "docs/reference.md"],
    "python train_gpt2.py --benchmark --max_steps 50": ["docs/reference.md", "benchmarks/README.md"],
}


def dry_command(command, data_dir, log_dir):
    """(argv, env) of a documented command with the sizes swapped."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run"] + \
            [("--nproc_per_node=2" if w.startswith("--nproc_per_node") else w) for w in words[1:]]
    else:
        words = [sys.executable] + words[1:]
    script = next(i for i, w in enumerate(words) if w.endswith(".py"))
    words[script] = os.path.join(REPO, words[script])
    first = ["--max_steps", "4", "--eval_every", "3", "--val_steps", "1", "--save_every", "2"]  # theirs win
    words[script + 1:script + 1] = first
    last = [*TINY, "--data_dir", data_dir, "--log_dir", log_dir]
    if "--recipe" in words and "speedrun" in words[words.index("--recipe") + 1]:
        last += ["--val_tokens", "256"]  # the speedruns' 10M val tokens, tiny
    return words + last, env


@pytest.mark.parametrize("command", list(DOCUMENTED))
def test_documented_gpu_commands_run_on_cpu(command, shakespeare_shards, hellaswag_dir, tmp_path):
    for doc in DOCUMENTED[command]:
        with open(os.path.join(REPO, doc)) as f:
            assert command in f.read().replace("\n", " "), f"{doc} no longer shows `{command}`: update this list"
    argv, env = dry_command(command, shakespeare_shards, str(tmp_path / "log"))
    proc = run(argv, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "benchmark: median" in proc.stdout or "done: 4 steps" in proc.stdout


def test_the_side_by_side_scripts_project_command_runs_on_cpu(shakespeare_shards, tmp_path):
    """../shared/bench/gpu_side_by_side.sh trains the project for 40 steps at the defaults on its own shards (its
    reference run, build-nanogpt's 124M, needs the GPU): that command, as the script has it, tiny."""
    path = os.path.join(os.path.dirname(SHARED), "bench", "gpu_side_by_side.sh")
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    text = open(path).read().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if "python3 train_gpt2.py --" in line)  # (not the reference's)
    flags = line.split("python3 train_gpt2.py", 1)[1].split('"$@"')[0]
    flags = flags.replace('"$W/shards"', shakespeare_shards).replace('"$W/ourlog"', str(tmp_path / "log"))
    flags = flags.replace('"$STEPS"', "40")
    proc = run([sys.executable, os.path.join(REPO, "train_gpt2.py"), *shlex.split(flags), *TINY], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^step +39 \| .* dt [\d.]+ms", proc.stdout, flags=re.M)  # what the script's median parses
