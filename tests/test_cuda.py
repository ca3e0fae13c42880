"""
The CUDA paths: bf16 autocast, compile (HellaSwag's dynamic-shape graph too), fused AdamW, NCCL, pinned
prefetching, the SDPA kernels, -B auto's out-of-memory search, the chunked loss in bf16, CUDA RNG state
in checkpoints, and export from a GPU-trained checkpoint. Small models.

Each test whose logic a CPU can run (bf16 autocast, compile, FSDP, resume, the preflight) runs on CPU too, in
the suite (marked slow), so that a test that cannot pass anywhere fails here first, not on a GPU lent for
minutes; the GPU-only checks (NCCL, the CUDA kernels, real out-of-memory errors) are marked cuda alone. The
cheap tests come first in this file: a run cut short by its time still names them.

    python -m pytest -q -m cuda tests/test_cuda.py      # on a GPU machine (benchmarks/gpu.sh runs it)
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_MODEL, read_log, run, run_script

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (see "
                                                                                 "benchmarks/gpu.sh)")]
# the CPU half runs bf16 autocast and compile as the GPU does, in the suite's slow part
DEVICES = [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=CUDA)]

STEPS = 12


def device_flags(device):
    """CUDA's defaults (bf16, compile, fused AdamW, TF32, pinned prefetch); on CPU, bf16 autocast and compile."""
    return [] if device == "cuda" else ["--device", "cpu", "--dtype", "bf16", "--compile"]


def tiny_gpt(device, **changes):
    from train_gpt2 import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=64, **changes)).to(device)


# --- the cheap ones first: no training run


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_cross_entropy_in_bf16(device):
    plain, chunked = tiny_gpt(device), tiny_gpt(device, ce_chunk_rows=100)
    chunked.load_state_dict(plain.state_dict())
    idx, targets = (torch.randint(0, 50257, (4, 128), device=device) for _ in range(2))
    results = []
    for model in (plain, chunked):
        with torch.autocast(device, dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        results.append((loss.item(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (loss, grads), (chunked_loss, chunked_grads) = results
    assert chunked_loss == pytest.approx(loss, abs=1e-2)
    for name, g in grads.items():
        assert torch.allclose(chunked_grads[name], g, atol=2e-2 * g.abs().max().item()), name


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient", "math"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (see benchmarks/gpu.sh)")
def test_each_sdpa_backend_is_the_kernel_that_runs(backend):
    """The kernel torch's dispatch really picks for the model's attention (torch._fused_sdp_choice: with math
    kept beside cuDNN, math was picked wherever torch's order put it first), and the logits agree with math's."""
    from machinery.speed import SDPA_BACKENDS, sdpa_kernel_in_use, select_sdpa_backend

    model = tiny_gpt("cuda").eval()
    idx = torch.randint(0, 50257, (4, 128), device="cuda")
    try:
        outputs = []
        for name in ("math", backend):
            select_sdpa_backend(name, "cuda")
            assert sdpa_kernel_in_use(2, 128, 32, "cuda", torch.bfloat16) == SDPA_BACKENDS[name], name
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                outputs.append(model(idx)[0].float())
    finally:
        select_sdpa_backend("auto", "cuda")
    want, got = outputs
    assert (got - want).abs().max().item() < 3e-2 * want.abs().max().item(), backend


@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_in_bf16(device):
    model = tiny_gpt(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seq = torch.randint(0, 50257, (2, 100), device=device)
    caches = [{} for _ in model.transformer.h]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        model.hidden_states(seq[:, :60], caches)
        got = torch.cat([model.hidden_states(seq[:, t:t + 1], caches) for t in range(60, 100)], 1).float()
        want = model.hidden_states(seq)[:, 60:].float()
    assert (got - want).abs().max().item() < 3e-2 * want.abs().max().item()
    idx = seq[:, :7]  # fp32: the sampled tokens themselves match
    runs = [model.generate(idx, 40, top_k=1, generator=torch.Generator(device).manual_seed(5), use_cache=c)
            for c in (True, False)]
    assert torch.equal(runs[0], runs[1])


# --- training runs


@pytest.fixture(scope="module")
def cuda_shards(build_once):
    """Shards that cycle through 64 token ids: a pattern a 2-layer GPT learns within 12 steps (the val loss from
    10.85 to 8.50 on CPU at the CPU half's sizes). (Shards of ever-new ids, (1000 * shard + j) % 50000, taught
    it nearly nothing in 20 steps: 10.84 to 10.77.)"""
    def make(root):
        os.makedirs(root)
        for name, n in [("val_000000", 40_000), ("train_000001", 60_000), ("train_000002", 60_000)]:
            np.save(root / f"edufineweb_{name}.npy", (100 + np.arange(n) % 64).astype(np.uint16))
        return str(root)

    return build_once("cuda_shards", make)


def train_args(device, data_dir, log_dir, *extra):
    """The device's defaults, a tiny GPT, 2 accumulation steps. On CPU a quarter of the batch and 8 HellaSwag
    examples: this CPU has no bf16 matmul units, and emulated bf16 ran 1.6 s a step even at 128 tokens."""
    sizes = ["-B", 8, "-T", 64, "--total_batch_size", 1024, "--hellaswag_limit", 40] if device == "cuda" else \
        ["-B", 2, "-T", 32, "--total_batch_size", 128, "--hellaswag_limit", 8]
    return [os.path.join(REPO, "train_gpt2.py"), "--data_dir", data_dir, "--log_dir", log_dir, *TINY_MODEL, *sizes,
            "--max_steps", STEPS, "--warmup_steps", 2, "--max_lr", 3e-3, "--eval_every", 6, "--val_steps", 2,
            "--save_every", 4, "--checkpoint_every", 6, *device_flags(device), *extra]


def python(args):
    return [sys.executable, *map(str, args)]


def torchrun(args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *map(str, args)]


@pytest.fixture(scope="module", params=DEVICES)
def trained(request, build_once, cuda_shards, hellaswag_dir):
    """One uninterrupted run on the device, made once in the test run: (device, log dir, stdout)."""
    device = request.param

    def make(root):
        proc = run(python(train_args(device, cuda_shards, root / "log")))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return str(root / "log"), proc.stdout

    return (device, *build_once(f"trained_{device}", make))


def test_default_path_trains_evaluates_and_samples(trained):
    """It learns: the val loss falls at every evaluation, by 1.0 in all (on CPU, bf16 and compiled: 10.85, 9.09,
    8.50; the test once wanted that on data a 2-layer model cannot learn so fast, and could pass nowhere)."""
    device, log_dir, out = trained
    assert f"device {'cuda:0' if device == 'cuda' else 'cpu'} | dtype bf16 | compile True (default)" in out
    assert ("fused AdamW True" in out) == (device == "cuda")
    # compiled, HellaSwag and the samples run too (build-nanogpt had to turn compile off for them), and the
    # checkpoints hold the plain model's names
    assert out.count("HellaSwag accuracy: ") == 3 and "sample 3: Hello, I'm a language model," in out
    ckpt = torch.load(os.path.join(log_dir, f"model_{STEPS - 1:05d}.pt"), weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    log = read_log(os.path.join(log_dir, "log.txt"))
    assert sorted(log["val"]) == [0, 6, STEPS - 1] and sorted(log["hella"]) == [0, 6, STEPS - 1]
    assert log["val"][0] > log["val"][6] > log["val"][STEPS - 1]
    assert log["val"][STEPS - 1] < log["val"][0] - 1.0


def test_export_of_a_checkpoint_trained_in_bf16(trained, tmp_path):
    from transformers import GPT2LMHeadModel

    from train_gpt2 import GPT

    ckpt = os.path.join(trained[1], f"model_{STEPS - 1:05d}.pt")
    proc = run_script("export.py", ckpt, tmp_path / "exported")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    ours = GPT.from_pretrained(ckpt).eval()
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0][..., :50257]).abs().max().item() < 1e-4


def test_preflight_passes_and_writes_nowhere(trained, cuda_shards, tmp_path):
    """Every phase (bf16, compile; fused AdamW on CUDA): the resumed steps agree within the device's
    tolerance, and --log_dir and the temporary folder are left as they were."""
    device = trained[0]
    os.makedirs(tmp_path / "tmp")
    proc = run(python(train_args(device, cuda_shards, tmp_path / "log", "--preflight")),
               env={"TMPDIR": str(tmp_path / "tmp")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "preflight passed: every phase ran" in proc.stdout
    assert (" on cuda:0, reserved" if device == "cuda" else " (this process)") in proc.stdout
    assert not os.path.exists(tmp_path / "log")
    assert not [n for n in os.listdir(tmp_path / "tmp") if n.startswith("train_gpt2-preflight-")]


def test_fsdp_on_one_device_trains_like_the_default_path_and_resumes(trained, cuda_shards, tmp_path):
    """--fsdp --recompute under torchrun on one device: DDP's precision (fp32 weights, bf16 autocast),
    compiled blocks (fused AdamW on CUDA); its losses near the default path's (bf16: 0.05), then its sharded
    folder resumed. The compiled blocks stay static through the evaluations: HellaSwag's batches and the
    samples' KV cache, had they gone through those blocks, would recompile them (5 recompilations before the
    fix) and leave the training graph dynamic-shape for the rest of the run; evaluations run eager instead."""
    device, reference, _ = trained
    log_dir = tmp_path / "log"

    def command(log_dir, *extra):
        return torchrun(train_args(device, cuda_shards, log_dir, "--fsdp", "--recompute", *extra))

    # (conftest's one-file C++ wrapper cannot lower --recompute's saved RNG state: inductor's own wrapper here)
    wrapper = {"TORCHINDUCTOR_CPP_WRAPPER": "0"}
    proc = run(command(log_dir), env={"TORCH_LOGS": "recompiles", **wrapper})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "processes 1 (FSDP: sharded) | recompute" in proc.stdout
    assert "HellaSwag accuracy" in proc.stdout and "sample 0:" in proc.stdout
    assert "Recompiling" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert ("fused AdamW True" in proc.stdout) == (device == "cuda")
    got, want = read_log(log_dir / "log.txt"), read_log(os.path.join(reference, "log.txt"))
    for step, value in want["train"].items():
        assert got["train"][step] == pytest.approx(value, abs=0.05), step
    assert sorted(os.listdir(log_dir / "ckpt_00008")) == [".metadata", "__0_0.distcp", "state.pt"]
    again = run(command(tmp_path / "again", "--resume", log_dir / "ckpt_00008"), env=wrapper)
    assert again.returncode == 0 and "resuming at step 8" in again.stdout, again.stderr[-3000:]


def test_sigterm_then_resume_continues_the_run(trained, cuda_shards, tmp_path):
    """Losses after the resume equal the uninterrupted run's to 0.02 (bf16 and compiled kernels need not be
    bitwise repeatable); the data position is exact, and on a GPU its RNG state is saved. The resume runs
    under torchrun, one process: NCCL on a GPU, gloo on CPU."""
    device, reference, _ = trained
    log_dir = str(tmp_path / "log")
    args = train_args(device, cuda_shards, log_dir)
    proc = subprocess.Popen(python(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    log_file = os.path.join(log_dir, "log.txt")
    deadline = time.time() + 300
    while not (os.path.exists(log_file) and any(line.startswith("6 train") for line in open(log_file))):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    resumed = run(torchrun(args))
    assert resumed.returncode == 0 and "resuming at step" in resumed.stdout, resumed.stderr[-3000:]
    assert "processes 1" in resumed.stdout
    got, want = read_log(log_file), read_log(os.path.join(reference, "log.txt"))
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}
    for step, value in want["train"].items():
        assert got["train"][step] == pytest.approx(value, abs=0.02), step
    ours, theirs = (torch.load(os.path.join(d, "ckpt_00008.pt"), weights_only=True) for d in (log_dir, reference))
    assert ours["data"] == theirs["data"] and ("cuda" in ours["rng"]) == (device == "cuda")


# --- GPU only


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (see benchmarks/gpu.sh)")
def test_flash_kernel_runs_the_evaluation_samples_and_the_gpu_is_in_the_peak_table(cuda_shards, tmp_path,
                                                                                  hellaswag_dir):
    """--sdpa_backend flash keeps math for the KV cache's masked calls: an evaluation with samples runs. The
    GPU's name is looked up whole, and the run says which peak MFU uses."""
    from machinery import speed

    proc = run(python(train_args("cuda", cuda_shards, tmp_path / "log", "--sdpa_backend", "flash",
                                 "--max_steps", 12)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sample 0: Hello, I'm a language model," in proc.stdout
    name = torch.cuda.get_device_name()
    if any(k in name for k in ("H100", "H200", "A100")):
        assert speed.gpu_peak(name) is not None, name
        assert f"MFU against {name}'s dense bf16 peak" in proc.stdout
    # bf16 only where the GPU computes it (T4 and V100 emulate it)
    major = torch.cuda.get_device_capability()[0]
    assert ("dtype bf16" in proc.stdout) == (major >= 8), proc.stdout[:500]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (see benchmarks/gpu.sh)")
def test_batch_auto_backs_off_from_a_real_out_of_memory(tmp_path):
    """GPT-2 124M at T=1024: -B 512 cannot fit in any single GPU's memory; -B auto must step down to one that does."""
    proc = run_script("train_gpt2.py", "--benchmark", "--max_steps", 2, "--warmup_steps", 1, "-B", "auto",
                      "--no-compile", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("total batch 524,288 tokens = "))
    B = int(line.split(" = ")[1].split(" x ")[0])
    assert 1 <= B < 512, line
