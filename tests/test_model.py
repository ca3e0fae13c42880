"""The GPT model, the optimizer groups and the learning-rate schedule."""

import dataclasses
import math

import pytest
import torch

import contextlib

from machinery.common import UserError
from machinery.speed import largest_micro_batch, micro_batch_candidates
from machinery import runtime, speed
import train_gpt2
from train_gpt2 import GPT, GPTConfig, get_lr, gpt_config, parse_args

TINY = GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random transformers GPT-2, saved the way save_pretrained writes the real ones."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=32, n_positions=48, vocab_size=211))
    with torch.no_grad():  # non-trivial biases and LayerNorm gains, so a mis-mapped one shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp("hf_gpt2"))
    model.save_pretrained(path)
    return path


def test_from_pretrained_logits_match_transformers(hf_dir):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    ours = GPT.from_pretrained(hf_dir).eval()
    assert ours.config == GPTConfig(block_size=48, vocab_size=211, n_layer=3, n_head=4, n_embd=32)
    idx = torch.randint(0, 211, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("family, n_head", [("gpt2-medium", 16), ("gpt2-large", 20), ("gpt2-xl", 25)])
def test_from_pretrained_reads_each_gpt2_familys_shape(family, n_head, tmp_path):
    """The bigger GPT-2s differ in depth, width and head count (heads of 64): random transformers models of
    each family's head count, at a small head size, load with equal logits."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=n_head, n_embd=4 * n_head, n_positions=32, vocab_size=97))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / family)
    ours = GPT.from_pretrained(str(tmp_path / family)).eval()
    assert (ours.config.n_head, ours.config.n_embd) == (n_head, 4 * n_head)
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[0] - hf.eval()(idx).logits).abs().max().item() < 1e-4


def test_model_presets_are_gpt2s_sizes_with_gpt3s_learning_rates():
    """--model: parameter counts from the sizes alone (on the meta device: no memory), and the GPT-3 paper's
    learning rate and batch for the nearest size, 10B tokens each; flags given still win."""
    table = {"gpt2": (12, 768, 12, 124, 6e-4, 2**19), "gpt2-medium": (24, 1024, 16, 355, 3e-4, 2**19),
             "gpt2-large": (36, 1280, 20, 774, 2.5e-4, 2**19), "gpt2-xl": (48, 1600, 25, 1558, 2e-4, 2**20)}
    for name, (L, C, H, millions, lr, batch) in table.items():
        args = parse_args(["--model", name])
        assert (args.n_layer, args.n_embd, args.n_head, args.max_lr, args.total_batch_size) == (L, C, H, lr, batch)
        assert args.max_steps * batch == pytest.approx(10e9, rel=1e-3)
        assert args.warmup_steps * batch == pytest.approx(375e6, rel=2e-3)
        with torch.device("meta"):
            model = GPT(train_gpt2.gpt_config(args))
        expected = 50304 * C + 1024 * C + L * (12 * C * C + 13 * C) + 2 * C  # wte, wpe, blocks, ln_f
        assert model.num_params(non_embedding=False) == expected and round(expected / 1e6) == millions
    assert parse_args(["--model", "gpt2-xl", "--max_lr", "1e-4"]).max_lr == 1e-4
    with pytest.raises(SystemExit):
        parse_args(["--model", "gpt2-xl", "--recipe", "speedrun"])


def test_from_pretrained_rejects_unknown_names(tmp_path):
    with pytest.raises(UserError, match="neither one of gpt2"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(UserError, match="could not load"):
        GPT.from_pretrained(str(tmp_path))  # a directory with no checkpoint in it


def test_weight_tying_and_gpt2_124m_size():
    model = GPT(GPTConfig(vocab_size=50304))
    assert model.transformer.wte.weight is model.lm_head.weight
    assert model.transformer.wte.weight.data_ptr() == model.lm_head.weight.data_ptr()
    # GPT-2 124M: 124,439,808 parameters at vocab 50257; padding adds 47 rows of 768
    assert model.num_params(non_embedding=False) == 124_439_808 + 47 * 768
    assert model.num_params() == 124_439_808 + 47 * 768 - 1024 * 768
    assert model.flops_per_token(1024) == 6 * model.num_params() + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("recipe", ["speedrun", "speedrun-simple"])
def test_flops_count_no_embedding_lookup(recipe):
    """An untied embedding table is a lookup: no FLOPs. Only the matrices that multiply count in 6N (with
    the embedding counted, the speedruns' MFU came out 1.27x too high)."""
    args = parse_args(["--recipe", recipe, "--n_layer", "2"])
    model = GPT(gpt_config(args))
    matmul = sum(p.numel() for name, p in model.named_parameters() if name != "transformer.wte.weight")
    L, C = args.n_layer, args.n_embd
    assert model.flops_per_token(1024) == 6 * matmul + 12 * L * C * 1024
    assert model.transformer.wte.weight.numel() == 50304 * 768  # which the count leaves out


def test_presets_fit_the_users_own_flags(monkeypatch, capsys):
    """A preset that the user's own --max_steps or world size makes impossible is scaled, in one note; what
    the command line names itself stays, and is refused when impossible."""
    a = parse_args(["--benchmark", "--max_steps", "30"])  # GPT-2's 715 warmup steps, in proportion
    assert (a.warmup_steps, a.max_steps) == (715 * 30 // 19073, 30)
    assert capsys.readouterr().out == ("note: the presets fitted to your flags: --warmup_steps 715 -> 1 (the "
                                       "preset's share of its 19073 steps, for --max_steps 30); pass them to choose\n")
    assert parse_args(["--model", "gpt2-xl", "--max_steps", "6"]).warmup_steps == 0  # 358 of 9537
    monkeypatch.setenv("WORLD_SIZE", "2")
    a = parse_args(["--first_try", "--max_steps", "20"])  # warmup 20 of 200 steps; 2,048 tokens at -B 16, T 128
    assert (a.warmup_steps, a.batch_size, a.total_batch_size) == (2, 8, 2048)
    assert "-B 16 -> 8 (2,048 tokens per step across 2 processes)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parse_args(["--first_try", "--max_steps", "20", "--warmup_steps", "20"])
    assert "--warmup_steps 20 must be below --max_steps 20" in capsys.readouterr().err
    assert parse_args(["--first_try", "-B", "16"]).batch_size == 16  # named: kept (and refused later, in one line)


def test_init_statistics():
    torch.manual_seed(0)
    n_layer = 4
    model = GPT(GPTConfig(block_size=256, vocab_size=4096, n_layer=n_layer, n_head=4, n_embd=256))
    residual_std = 0.02 / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            assert torch.all(p == 1), name
        else:
            expected = residual_std if name.endswith("c_proj.weight") else 0.02
            assert abs(p.std().item() - expected) < 0.03 * expected, (name, p.std().item(), expected)
            assert abs(p.mean().item()) < 0.05 * expected, name


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (4, 32))
    logits, loss = model(idx)
    assert logits.shape == (4, 32, TINY.vocab_size) and loss is None
    _, loss = model(idx, torch.randint(0, TINY.vocab_size, (4, 32)))
    # small init: every token about equally likely, so the loss is near ln(vocab)
    assert abs(loss.item() - math.log(TINY.vocab_size)) < 0.05
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros((1, 33), dtype=torch.long))


def test_attention_is_causal():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (1, 20))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[0, :10], b[0, :10])  # the future cannot reach the past
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_generate_is_seeded_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 5))
    out1 = model.generate(idx, 8, top_k=10, generator=torch.Generator().manual_seed(3))
    out2 = model.generate(idx, 8, top_k=10, generator=torch.Generator().manual_seed(3))
    assert out1.shape == (2, 13) and torch.equal(out1, out2) and torch.equal(out1[:, :5], idx)
    greedy = idx
    for _ in range(8):
        greedy = torch.cat([greedy, model(greedy)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(idx, 8, top_k=1), greedy)


def test_optimizer_groups():
    model = GPT(TINY)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=6e-4, device_type="cpu")
    decay, nodecay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and nodecay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in nodecay["params"])
    # every parameter exactly once (the tied embedding is one tensor)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    # decayed: wte(=lm_head), wpe, and the four matmul weights of each block
    assert len(decay["params"]) == 2 + 4 * TINY.n_layer
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert not opt.defaults.get("fused")  # fused is the CUDA kernel


def test_lr_schedule_gpt2_recipe():
    args = parse_args([])
    assert (args.max_lr, args.min_lr_ratio, args.warmup_steps, args.max_steps) == (6e-4, 0.1, 715, 19073)
    assert get_lr(0, args) == pytest.approx(6e-4 / 715)
    assert get_lr(357, args) == pytest.approx(6e-4 * 358 / 715)
    assert get_lr(714, args) == pytest.approx(6e-4)
    assert get_lr(715, args) == pytest.approx(6e-4)  # cosine starts at the top
    mid = 715 + (19073 - 715) // 2
    assert get_lr(mid, args) == pytest.approx((6e-4 + 6e-5) / 2, rel=1e-3)
    assert get_lr(19073, args) == pytest.approx(6e-5)
    assert get_lr(30000, args) == pytest.approx(6e-5)
    lrs = [get_lr(s, args) for s in range(715, 19074)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_defaults_are_the_gpt2_124m_recipe():
    a = parse_args([])
    assert (a.batch_size, a.seq_len, a.total_batch_size) == (64, 1024, 524288)
    assert (a.weight_decay, a.grad_clip, a.eval_every, a.val_steps, a.checkpoint_every) == (0.1, 1.0, 250, 20, 5000)
    assert (a.n_layer, a.n_head, a.n_embd, a.block_size, a.vocab_size) == (12, 12, 768, 1024, 50304)
    assert a.seed == 1337 and a.hellaswag and a.data_dir == "edu_fineweb10B" and a.log_dir == "log"
    # speed switches that change nothing in the math, or are not measured yet, keep torch's behaviour
    assert (a.chunked_ce, a.sdpa_backend, a.compile_mode, a.prefetch) == (0, "auto", "default", True)


def gradients(model, idx, targets, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        logits, loss = model(idx, targets)
    (loss / 3).backward()  # a scaled loss, as gradient accumulation makes it
    return logits, loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_rows", [1, 37, 128, 1000])  # one row, ragged chunks, exact chunks, one chunk
def test_chunked_cross_entropy_equals_the_whole_batch_loss(chunk_rows):
    torch.manual_seed(0)
    plain = GPT(TINY)
    chunked = GPT(dataclasses.replace(TINY, ce_chunk_rows=chunk_rows))
    chunked.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, 101, (4, 32)), torch.randint(0, 101, (4, 32))
    _, loss, grads = gradients(plain, idx, targets, autocast=False)
    logits, chunked_loss, chunked_grads = gradients(chunked, idx, targets, autocast=False)
    assert logits is None  # the whole-batch logits are never made
    assert chunked_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    for name, g in grads.items():
        assert torch.allclose(chunked_grads[name], g, atol=1e-7, rtol=1e-5), name
    assert grads["transformer.wte.weight"].abs().max() > 1e-3  # = lm_head.weight: not zeros compared

    # under bf16 autocast: the same up to bf16 rounding; without gradients: the same loss, no gradients made
    _, loss, grads = gradients(plain, idx, targets, autocast=True)
    _, chunked_loss, chunked_grads = gradients(chunked, idx, targets, autocast=True)
    assert chunked_loss.item() == pytest.approx(loss.item(), abs=1e-3)
    for name, g in grads.items():
        # a few bf16 ulps (2**-8) of the largest entry: the loss scale is applied after the bf16 matmuls here
        assert torch.allclose(chunked_grads[name], g, atol=2e-2 * g.abs().max().item()), name
    with torch.no_grad():
        assert chunked(idx, targets)[1].item() == pytest.approx(plain(idx, targets)[1].item(), abs=1e-6)


def test_micro_batch_candidates_divide_the_batch():
    assert micro_batch_candidates(524288, 1024, 1) == [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert micro_batch_candidates(524288, 1024, 8) == [64, 32, 16, 8, 4, 2, 1]
    assert micro_batch_candidates(6 * 64, 32, 2) == [6, 3, 2, 1]
    assert micro_batch_candidates(524288, 1024, 3) == []  # no micro-batch makes 2**19 with 3 processes


def test_largest_micro_batch_skips_what_the_device_refuses():
    """A micro-batch whose allocations the device refuses (here 2**40 tokens on the CPU) is passed over;
    probing leaves the weights, the gradients and the global RNG as they were."""
    torch.manual_seed(0)
    model = GPT(TINY)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    B = largest_micro_batch(model, [2 ** 35, 8, 4], 32, 101, contextlib.nullcontext(), "cpu", reserve_bytes=1024)
    assert B == 8
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.get_rng_state())
    with pytest.raises(UserError, match=f"not even -B {2 ** 35} fits in cpu memory"):
        largest_micro_batch(model, [2 ** 35], 32, 101, contextlib.nullcontext(), "cpu", reserve_bytes=1024)


def test_largest_micro_batch_steps_down_from_an_out_of_memory_met_while_compiling():
    """torch.compile wraps an out-of-memory error raised by its backend (max-autotune's benchmarking) in
    BackendCompilerFailed: -B auto follows the chain of causes and tries the next size."""
    calls = []

    def backend(gm, example_inputs):
        calls.append(len(example_inputs))
        if len(calls) == 1:  # the largest candidate's compilation
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (raised by the test)")
        return gm.forward

    torch.manual_seed(0)
    model = torch.compile(GPT(TINY), backend=backend)
    B = largest_micro_batch(model, [8, 4], 32, 101, contextlib.nullcontext(), "cpu", reserve_bytes=1024)
    assert B == 4 and len(calls) >= 2


def test_running_out_of_gpu_memory_is_one_line_naming_a_smaller_batch():
    args = train_gpt2.parse_args([])
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB. GPU 0 has a total capacity of "
                                 "39.49 GiB")
    e = train_gpt2.out_of_memory_error(args, oom)
    assert isinstance(e, UserError) and "\n" not in str(e)
    assert str(e).startswith("out of GPU memory at -B 64 (CUDA out of memory. Tried to allocate 3.07 GiB")
    assert "pass -B 32 (the same --total_batch_size" in str(e) and "-B auto" in str(e)
    # a long message is cut at a word, not inside a number
    long = torch.OutOfMemoryError("CUDA out of memory. " + "Tried to allocate 3.07 GiB. " * 9)
    assert str(train_gpt2.out_of_memory_error(args, long)).split("(", 1)[1].startswith("CUDA out of memory. Tried")
    assert "GiB. ...)" in str(train_gpt2.out_of_memory_error(args, long))


def test_each_process_gets_its_own_device():
    """Under torchrun each rank takes its LOCAL_RANK's GPU (an index in --device is refused there); outside it,
    --device cuda:N is GPU N, checked against the GPUs there are. Also hellaswag.py's ranks, and sample.py's."""
    assert runtime.process_device("cuda", "cuda", 3, ddp=True) == "cuda:3"
    assert runtime.process_device(None, "cuda", 5, ddp=True) == "cuda:5"
    assert runtime.process_device("cpu", "cpu", 1, ddp=True) == "cpu"
    with pytest.raises(UserError, match="under torchrun each rank uses the GPU of its LOCAL_RANK"):
        runtime.process_device("cuda:1", "cuda", 0, ddp=True)
    if torch.cuda.device_count() < 2:
        with pytest.raises(UserError, match=f"--device cuda:1: this machine has {torch.cuda.device_count()} CUDA"):
            runtime.process_device("cuda:1", "cuda", 0, ddp=False)
    else:
        assert runtime.process_device("cuda:1", "cuda", 0, ddp=False) == "cuda:1"
    assert not runtime.bf16_supported("cpu")


def test_mfu_peak_matches_whole_gpu_names():
    """The peak FLOP/s table matches a device name whole: an H100 NVL or PCIe card is not an H100 SXM, and
    V100 and T4 (which emulate bf16, so train in fp32) are measured against their fp32 peak."""
    assert speed.gpu_peak("NVIDIA H100 80GB HBM3") == (989.5, "dense bf16")
    assert speed.gpu_peak("NVIDIA H100 NVL") == (835.5, "dense bf16")
    assert speed.gpu_peak("NVIDIA H100 PCIe") == (756.5, "dense bf16")
    assert speed.gpu_peak("NVIDIA H200 NVL") == (835.5, "dense bf16")
    assert speed.gpu_peak("NVIDIA A100-SXM4-40GB") == speed.gpu_peak("NVIDIA A100 80GB PCIe") == (312.0, "dense bf16")
    assert speed.gpu_peak("NVIDIA L40") == (181.0, "dense bf16") and speed.gpu_peak("NVIDIA L4")[0] == 121.0
    assert speed.gpu_peak("Tesla V100-SXM2-16GB") == (15.7, "fp32") and speed.gpu_peak("Tesla T4") == (8.1, "fp32")
    assert speed.gpu_peak("NVIDIA GeForce RTX 4090") == (165.2, "dense bf16")
    for unknown in ("NVIDIA GeForce RTX 4090 D", "NVIDIA H100X", "NVIDIA A100X", "NVIDIA L4 Ada"):
        assert speed.gpu_peak(unknown) is None, unknown
    assert speed.peak_flops_source("cpu", 100) == "--peak_tflops 100"
