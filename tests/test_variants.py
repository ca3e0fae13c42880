"""
The opt-in variants (variants.py): --arch llama and modern, Muon, the WSD schedule and the --recipe
presets. Each arch is checked for what GPT-2's path is checked for: gradients, KV-cache generation,
compile, DDP, exact resume, export, and learning on real text.
"""

import contextlib
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, TINY_MODEL, main_output, read_log, run, write_shards
from test_resume import finish, kill9, log_bytes, logged, start, wait_until

import hellaswag
import train_gpt2
import variants
from machinery.hf_convert import export_to_transformers
from train_gpt2 import GPT, GPTConfig

ARCHS = [("llama", False), ("modern", False), ("modern", True), ("llama", True), ("simple", True)]
# what --recipe speedrun-simple adds to --arch simple
SIMPLE = dict(bias=True, rotary="half", attn_scale=0.12, embed_norm=True, logit_softcap=15.0)


def tiny(arch, untie_head=False, **kw):
    torch.manual_seed(0)
    sizes = dict(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64)
    return GPT(GPTConfig(arch=arch, untie_head=untie_head, **{**sizes, **(SIMPLE if arch == "simple" else {}), **kw}))


@pytest.mark.parametrize("arch, untie", ARCHS)
def test_forward_backward_and_the_kv_cache(arch, untie):
    model = tiny(arch, untie)
    assert "wpe" not in model.transformer  # rotary positions only
    assert (model.lm_head.weight is model.transformer.wte.weight) == (not untie)
    x = torch.randint(0, 256, (3, 40))
    _, loss = model(x, x.roll(-1, dims=1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if arch in ("modern", "simple"):  # zero output projections (and head, untied): a residual stream of embeddings
        assert all(b.attn.c_proj.weight.abs().sum() == 0 and b.mlp.c_proj.weight.abs().sum() == 0
                   for b in model.transformer.h)
    if untie:
        assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=1e-5)
    model.eval()
    for p in model.parameters():  # zero-initialised weights would make every position alike: perturb them
        p.data += 0.05 * torch.randn_like(p)
    prompt = x[:, :7]
    a = model.generate(prompt, 30, generator=torch.Generator().manual_seed(3), use_cache=True)
    b = model.generate(prompt, 30, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b)
    # the cache's rotary offsets: the last position's logits, step by step, equal one pass over everything
    caches = [{} for _ in model.transformer.h]
    model.hidden_states(a[:, :20], caches)
    stepped = model.hidden_states(a[:, 20:21], caches)
    assert torch.allclose(stepped[:, -1], model.hidden_states(a[:, :21])[:, -1], atol=1e-5)


def test_llama_shape_and_size():
    assert variants.swiglu_hidden(768) == 2048
    model = GPT(GPTConfig(arch="llama"))
    assert 123e6 < model.num_params(non_embedding=False) < 125e6  # about GPT-2 small, tied embeddings
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (2048, 768)
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "modern", "simple"])
def test_compile_gives_the_same_loss_and_gradients(arch):
    model = tiny(arch, arch != "llama")
    for p in model.parameters():
        p.data += 0.02 * torch.randn_like(p)
    x = torch.randint(0, 256, (2, 32))
    _, eager = model(x, x)
    eager.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, compiled = torch.compile(model)(x, x)
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), abs=1e-5)
    assert all(torch.allclose(g, p.grad, atol=1e-5) for g, p in zip(grads, model.parameters()))


def test_muon_groups_and_wsd_schedule():
    args = train_gpt2.parse_args(["--recipe", "speedrun", "--max_steps", "100"])
    assert (args.arch, args.untie_head, args.optimizer, args.schedule) == ("modern", True, "muon", "wsd")
    model = tiny("modern", True)
    opt = variants.muon_optimizers(model, args, fused=False)
    muon = opt.optimizers["muon"].param_groups[0]
    blocks = {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    assert {id(p) for p in muon["params"]} == blocks and muon["lr"] == args.max_lr
    adam = opt.optimizers["adamw"].param_groups
    assert adam[0]["params"] == [model.transformer.wte.weight] and adam[0]["lr"] == args.embed_lr
    assert any(model.lm_head.weight is p and g["lr"] == args.adam_lr for g in adam for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # WSD: no warmup in the preset, flat at max_lr, then a straight line from step 72 to 0 at step 100
    lrs = [train_gpt2.get_lr(s, args) for s in range(100)]
    assert lrs[:73] == [0.05] * 73 and lrs[73] < 0.05
    assert lrs[99] == pytest.approx(0.05 / 28) and all(a > b for a, b in zip(lrs[72:], lrs[73:]))
    assert variants.muon_momentum(0, 300) == 0.85 and variants.muon_momentum(150, 300) == pytest.approx(0.9)
    assert variants.muon_momentum(10_000, 300) == 0.95 and args.muon_momentum_warmup == 300
    assert (args.muon_ns_coefficients, args.muon_ns_steps) == ((3.4445, -4.775, 2.0315), 5)  # torch's defaults
    assert opt.optimizers["muon"].defaults["ns_steps"] == 5 and adam[0]["betas"] == (0.9, 0.95)


def test_speedrun_simple_preset_is_the_reference_recipe():
    """records/track_3_optimization/train_gpt_simple.py's sizes, init, optimizers and schedule, checked from the
    numbers the reference writes, not from this repo's code."""
    args = train_gpt2.parse_args(["--recipe", "speedrun-simple"])
    assert (args.max_steps, args.total_batch_size, args.seq_len, args.eval_every) == (3250, 2**19, 1024, 125)
    assert (args.val_tokens, args.grad_clip, args.warmup_steps) == (20 * 2**19, 0.0, 0)
    with torch.device("meta"):  # the full size, without its memory
        full = GPT(train_gpt2.gpt_config(args))
    C, V, L = 768, 50304, 12
    block = 4 * (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 2 * C  # q, k, v, proj; fc, proj; two gains
    assert full.num_params(non_embedding=False) == V * C + L * block + (C * V + V) + 2 * C  # embed, blocks, head, norms
    assert C // full.config.n_head == 128 and full.lm_head.weight is not full.transformer.wte.weight

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=64, arch="simple",
                          untie_head=True, **SIMPLE))
    for name, p in model.named_parameters():
        if name.endswith("bias") or "c_proj" in name or name == "lm_head.weight":
            assert (p == 0).all(), name  # biases, and the projections into the residual stream and the head
        elif p.dim() == 1:
            assert (p == 1).all(), name  # the gains
        elif name == "transformer.wte.weight":
            assert abs(p.std().item() - 1) < 0.03, name
        else:
            assert abs(p.std().item() / (0.33 / p.size(1)) ** 0.5 - 1) < 0.06, name

    opt = variants.muon_optimizers(model, args, fused=False)
    adam, (muon,) = opt.optimizers["adamw"].param_groups, opt.optimizers["muon"].param_groups
    by_lr = {g["lr"]: g["params"] for g in adam}
    assert by_lr[0.7] == [model.transformer.wte.weight] and by_lr[0.004] == [model.lm_head.weight]
    assert {id(p) for p in by_lr[0.015]} == {id(p) for p in model.parameters() if p.dim() == 1}
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 and g["weight_decay"] == 0.001 for g in adam)
    assert {id(p) for p in muon["params"]} == {id(p) for p in model.transformer.h.parameters() if p.dim() == 2}
    assert (muon["lr"], muon["weight_decay"], muon["momentum"], muon["nesterov"]) == (0.025, 0.05, 0.95, True)
    assert (muon["ns_coefficients"], muon["ns_steps"], muon["adjust_lr_fn"]) == ((2.0, -1.5, 0.5), 12, "original")
    assert variants.muon_momentum(0, args.muon_momentum_warmup) == 0.95  # no momentum warmup
    for step in (0, 974, 975, 976, 2000, 3249):  # constant for 30% of the steps, then linear towards zero
        progress = step / 3250
        eta = 1.0 if progress < 0.3 else (1 - progress) / 0.7
        assert train_gpt2.get_lr(step, args) == pytest.approx(0.025 * eta, rel=1e-12), step


def reference_forward(model, idx):
    """The speedrun-simple model written out from its formulas, with the model's weights: (B, T, V) logits."""
    w, cfg = dict(model.named_parameters()), model.config
    B, T = idx.shape
    C, H = cfg.n_embd, cfg.n_head
    D = C // H

    def rms(x, gain=None):
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)
        return x if gain is None else x * gain

    def linear(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    freq = torch.cat([(1 / 1024) ** torch.linspace(0, 1, D // 4), torch.zeros(D // 4)])  # D/2 of them
    theta = torch.arange(T, dtype=torch.float32)[:, None] * freq[None, :]

    def rotate(u):  # (B, H, T, D): the first half with the second, as the reference turns them
        u1, u2 = u[..., :D // 2], u[..., D // 2:]
        return torch.cat([u1 * theta.cos() + u2 * theta.sin(), -u1 * theta.sin() + u2 * theta.cos()], dim=-1)

    x = rms(w["transformer.wte.weight"][idx], w["transformer.ln_e.weight"])
    future = torch.ones(T, T).triu(1).bool()
    for i in range(cfg.n_layer):
        b = f"transformer.h.{i}"
        h = rms(x, w[f"{b}.ln_1.weight"])
        q, k, v = (linear(h, f"{b}.attn.c_{n}").view(B, T, H, D).transpose(1, 2) for n in "qkv")
        q, k = rotate(rms(q)), rotate(rms(k))
        att = (0.12 * q @ k.transpose(-1, -2)).masked_fill(future, float("-inf")).softmax(dim=-1)
        x = x + linear((att @ v).transpose(1, 2).reshape(B, T, C), f"{b}.attn.c_proj")
        h = rms(x, w[f"{b}.ln_2.weight"])
        x = x + linear(linear(h, f"{b}.mlp.c_fc").relu().square(), f"{b}.mlp.c_proj")
    logits = linear(rms(x, w["transformer.ln_f.weight"]), "lm_head")
    return 15 * logits / torch.sqrt(logits.square() + 15 ** 2)


def test_speedrun_simple_forward_equals_its_formulas():
    model = tiny("simple", True, n_head=2, n_embd=32)
    for p in model.parameters():  # zero projections and unit gains would hide most of the formulas
        p.data = 0.3 * torch.randn_like(p) + (1 if p.dim() == 1 and p.data.eq(1).all() else 0)
    idx = torch.randint(0, 256, (2, 24))
    targets = idx.roll(-1, dims=1)
    logits, loss = model(idx, targets)
    with torch.no_grad():
        expected = reference_forward(model, idx)
    assert torch.allclose(logits, expected, atol=2e-5), (logits - expected).abs().max()
    assert logits.abs().max() < 15  # capped
    assert loss.item() == pytest.approx(F.cross_entropy(expected.view(-1, 256), targets.view(-1)).item(), abs=1e-5)


def test_val_tokens_scores_exactly_the_first_n_tokens_whatever_b_and_the_ranks():
    """A stand-in model whose loss is the mean of its target ids shows which tokens were scored: the mean over
    tokens 1..N, at every B and number of ranks (each rank's share summed, as the all-reduce does)."""
    class TargetMean(torch.nn.Module):
        def forward(self, x, y):
            return None, y.double().mean()

    T, n = 8, 8 * 13
    tokens = torch.arange(1000, 1000 + n + 1)
    for world_size in (1, 2, 3):
        for B in (1, 2, 5):
            shares = [train_gpt2.val_loss_over_tokens(TargetMean(), tokens, B, T, train_gpt2.Compute(
                False, r, r, world_size, "cpu", "cpu", "fp32", contextlib.nullcontext(), False))
                for r in range(world_size)]
            assert sum(shares).item() == pytest.approx(tokens[1:].double().mean().item(), rel=1e-12)


def test_muon_on_a_torch_without_it_is_one_line(monkeypatch):
    args = train_gpt2.parse_args(["--recipe", "speedrun"])
    monkeypatch.delattr(torch.optim, "Muon")  # as on torch < 2.9
    with pytest.raises(train_gpt2.UserError, match=r"needs torch.optim.Muon, in torch 2.9 and later .*pip install -U"):
        variants.muon_optimizers(tiny("modern", True), args, fused=False)


def test_llama_export_round_trip_through_llama_for_causal_lm(tmp_path, enc):
    from transformers import AutoTokenizer, LlamaForCausalLM

    for untie in (False, True):
        model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=4, n_embd=64, arch="llama",
                              untie_head=untie)).eval()
        for p in model.parameters():
            p.data += 0.02 * torch.randn_like(p)
        out = str(tmp_path / f"llama_{untie}")
        export_to_transformers(model, out)
        hf = LlamaForCausalLM.from_pretrained(out).eval()
        assert hf.config.tie_word_embeddings == (not untie)
        x = torch.tensor([enc.encode("The rotary embedding turns each query and key by its position.")])
        with torch.no_grad():
            ours = model(x)[0][..., :50257]
            assert (ours - hf(x).logits).abs().max() <= 1e-4
            back = GPT.from_pretrained(out).eval()  # and into this repo's GPT again
            assert (back(x)[0] - hf(x).logits).abs().max() <= 1e-4
        assert AutoTokenizer.from_pretrained(out).encode("Hello world") == enc.encode("Hello world")
    for arch in ("modern", "simple"):
        with pytest.raises(train_gpt2.UserError, match=f"--arch {arch} has no stock transformers class"):
            export_to_transformers(tiny(arch), str(tmp_path / arch))
        assert not os.path.exists(tmp_path / arch)


# -----------------------------------------------------------------------------
# Whole runs


# val loss after 16 steps of 256 tokens of Tiny Shakespeare (TINY_MODEL, the preset's learning rates), from
# ln(50304) = 10.8 at step 0; GPT-2's own recipe learns in test_train.py
LEARNS_BELOW = {"llama": 10.7, "speedrun": 8.0, "speedrun-simple": 9.0}  # simple: 10.83 -> 8.32 measured


def run_args(data_dir, log_dir, recipe, extra=()):
    """A tiny run of a preset with its own learning rates; only the length and sizes are scaled down."""
    return ["--recipe", recipe, "--data_dir", data_dir, "--log_dir", log_dir, *TINY_MODEL, "-B", 4, "-T", 32,
            "--total_batch_size", 256, "--max_steps", 16, "--warmup_steps", 0 if "speedrun" in recipe else 3,
            "--eval_every", 5, "--val_steps", 2, "--hellaswag_limit", 6, "--no-sample", "--save_every", 3,
            "--checkpoint_every", 8, *(["--val_tokens", 2048] if recipe == "speedrun-simple" else []), *extra]


@pytest.mark.slow
# speedrun-simple covers what resuming adds over GPT-2's (tests/test_resume.py): rotary tables, computed and never
# saved, and two optimizers' state (speedrun's are the same code; its checkpoint is resumed in test_layout.py)
@pytest.mark.parametrize("recipe", ["speedrun-simple"])
def test_kill9_then_resume_is_byte_identical(recipe, shakespeare_shards, tmp_path, hellaswag_dir):
    ref = str(tmp_path / "ref")
    stdout = finish(run_args(shakespeare_shards, ref, recipe))
    arch = {"llama": "llama", "speedrun": "modern", "speedrun-simple": "simple"}[recipe]
    assert f"recipe {recipe}: arch {arch}{'' if recipe == 'llama' else ' (untied head)'}" in stdout
    log_dir = str(tmp_path / "log")
    k = random.Random().randint(4, 12)
    proc = start(run_args(shakespeare_shards, log_dir, recipe))
    wait_until(proc, logged(log_dir, f"{k} train"))
    kill9(proc)
    assert "resuming at step" in finish(run_args(shakespeare_shards, log_dir, recipe))
    assert log_bytes(log_dir) == log_bytes(ref), f"killed after step {k}"
    val = read_log(os.path.join(ref, "log.txt"))["val"]  # the preset learns real text at its own rates
    assert val[0] > 10.5 and val[15] < LEARNS_BELOW[recipe], val
    ckpt = torch.load(os.path.join(ref, "model_00015.pt"), weights_only=True)
    assert ckpt["config"]["arch"] == arch and ckpt["args"]["recipe"] == recipe
    if recipe != "llama":  # both optimizers' state travels in the checkpoint
        assert set(ckpt["optimizer"]) == {"adamw", "muon"}
    # the model loads back for scoring and sampling, soft cap and all
    path = os.path.join(ref, "model_00015.pt")
    scorer = hellaswag.load_model(path, "cpu")
    assert hellaswag.evaluate(scorer, "cpu", limit=4).total == 4
    back = GPT.from_pretrained(path).eval()
    assert back.config.arch == arch and back.generate(torch.tensor([[1, 2, 3]]), 5).shape == (1, 8)
    if recipe == "speedrun-simple":
        assert (back.config.logit_softcap, back.config.rotary, back.config.bias) == (15.0, "half", True)
        with torch.no_grad():
            hidden = back.hidden_states(torch.tensor([[1, 2, 3]]))
            assert torch.equal(scorer.head(hidden), back(torch.tensor([[1, 2, 3]]))[0])  # HellaSwag's logits: capped

    # another arch or optimizer refuses to resume, in one line
    for other in (["--arch", "modern" if recipe == "llama" else "llama"],
                  ["--optimizer", "muon" if recipe == "llama" else "adamw"]):
        with pytest.raises(SystemExit) as e:
            train_gpt2.main([str(a) for a in run_args(shakespeare_shards, log_dir, recipe,
                                                      ["--max_steps", 20, *other])])
        message = str(e.value)
        assert "\n" not in message and ("another model: arch" in message or "--optimizer" in message), message


def ddp_args(data, log_dir, recipe, B):
    """--val_tokens: the whole val shard, scored in rows of B, shared by the ranks."""
    return ["--recipe", recipe, "--data_dir", data, "--log_dir", log_dir, *TINY_MODEL, "-B", B, "-T", 32,
            "--total_batch_size", 256, "--max_steps", 8, "--warmup_steps", 0 if "speedrun" in recipe else 2,
            "--eval_every", 3, "--val_tokens", 4 * 128, "--no-hellaswag", "--no-sample"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["speedrun-simple"])  # DDP is the same for every arch; Muon's step is not AdamW's
def test_two_processes_equal_one_with_double_accumulation(recipe, tmp_path):
    """2 ranks at -B 2 against 1 at -B 4 (2 micro-steps each): the same tokens per step, and --val_tokens's
    loss over the same 512 val tokens however they are shared out."""
    data = str(tmp_path / "data")
    write_shards(data, [5 * 128 + 1, 3 * 128 + 1, 4 * 128 + 1])
    write_shards(data, [4 * 128 + 1], split="val", first_index=0)
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train_gpt2.py"), *map(str, ddp_args(data, tmp_path / "ddp", recipe, 2))])
    assert "val loss over the first 512 val tokens" in ddp.stdout and "x 2 processes x 2 accumulation" in ddp.stdout
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    single = main_output(train_gpt2.main, *ddp_args(data, tmp_path / "single", recipe, 4))  # in this process
    assert "x 1 processes x 2 accumulation" in single
    a, b = read_log(tmp_path / "ddp" / "log.txt"), read_log(tmp_path / "single" / "log.txt")
    assert sorted(a["train"]) == sorted(b["train"]) == list(range(8))
    for kind in ("train", "val"):
        for step, value in b[kind].items():
            # Muon orthogonalises in bf16 (torch's, like the speedrun's): the last fp32 bit of a gradient summed
            # in another order can round to another bf16 value, and that difference grows from step to step
            tol = 1e-2 if recipe != "llama" and step >= 2 else 5e-5
            assert a[kind][step] == pytest.approx(value, abs=tol), (kind, step)
