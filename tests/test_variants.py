"""
The opt-in variants (variants.py): --arch llama and modern, Muon, the WSD schedule and the --recipe
presets. Each arch is checked for what GPT-2's path is checked for: gradients, KV-cache generation,
compile, DDP, exact resume, export, and learning on real text.
"""

import os
import random
import sys

import pytest
import torch
from conftest import REPO, TINY_MODEL, read_log, run, write_shards
from test_resume import finish, kill9, log_bytes, logged, start, wait_until

import train_gpt2
import variants
from machinery.hf_convert import export_to_transformers
from train_gpt2 import GPT, GPTConfig

ARCHS = [("llama", False), ("modern", False), ("modern", True), ("llama", True)]


def tiny(arch, untie_head=False, **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64, arch=arch,
                         untie_head=untie_head, **kw))


@pytest.mark.parametrize("arch, untie", ARCHS)
def test_forward_backward_and_the_kv_cache(arch, untie):
    model = tiny(arch, untie)
    assert "wpe" not in model.transformer  # rotary positions only
    assert (model.lm_head.weight is model.transformer.wte.weight) == (not untie)
    x = torch.randint(0, 256, (3, 40))
    _, loss = model(x, x.roll(-1, dims=1))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if arch == "modern":  # zero-initialised output projections (and head, untied): a residual stream of embeddings
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
@pytest.mark.parametrize("arch", ["llama", "modern"])
def test_compile_gives_the_same_loss_and_gradients(arch):
    model = tiny(arch, arch == "modern")
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
    assert variants.muon_momentum(0) == 0.85 and variants.muon_momentum(150) == pytest.approx(0.9)
    assert variants.muon_momentum(10_000) == 0.95


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
    modern = tiny("modern")
    with pytest.raises(train_gpt2.UserError, match="modern has no stock transformers class"):
        export_to_transformers(modern, str(tmp_path / "modern"))
    assert not os.path.exists(tmp_path / "modern")


# -----------------------------------------------------------------------------
# Whole runs


# val loss after 16 steps of 256 tokens of Tiny Shakespeare (TINY_MODEL, the preset's learning rates), from
# ln(50304) = 10.8 at step 0; GPT-2's own recipe learns in test_train.py
LEARNS_BELOW = {"llama": 10.7, "speedrun": 8.0}


def run_args(data_dir, log_dir, recipe, extra=()):
    """A tiny run of a preset with its own learning rates; only the length and sizes are scaled down."""
    return ["--recipe", recipe, "--data_dir", data_dir, "--log_dir", log_dir, *TINY_MODEL, "-B", 4, "-T", 32,
            "--total_batch_size", 256, "--max_steps", 16, "--warmup_steps", 0 if recipe == "speedrun" else 3,
            "--eval_every", 5, "--val_steps", 2, "--hellaswag_limit", 6, "--no-sample", "--save_every", 3,
            "--checkpoint_every", 8, *extra]


@pytest.mark.slow
# speedrun covers what resuming adds over GPT-2's (tests/test_resume.py): the rotary tables, computed and never
# saved, and the state of two optimizers; llama's blocks have nothing of their own to save
@pytest.mark.parametrize("recipe", ["speedrun"])
def test_kill9_then_resume_is_byte_identical(recipe, shakespeare_shards, tmp_path, hellaswag_dir):
    ref = str(tmp_path / "ref")
    stdout = finish(run_args(shakespeare_shards, ref, recipe))
    assert f"recipe {recipe}: arch {'llama' if recipe == 'llama' else 'modern (untied head)'}" in stdout
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
    assert ckpt["config"]["arch"] == ("llama" if recipe == "llama" else "modern")
    assert ckpt["args"]["recipe"] == recipe
    if recipe == "speedrun":  # both optimizers' state travels in the checkpoint
        assert set(ckpt["optimizer"]) == {"adamw", "muon"}

    # another arch or optimizer refuses to resume, in one line
    for other in (["--arch", "modern" if recipe == "llama" else "llama"],
                  ["--optimizer", "adamw" if recipe == "speedrun" else "muon"]):
        with pytest.raises(SystemExit) as e:
            train_gpt2.main([str(a) for a in run_args(shakespeare_shards, log_dir, recipe,
                                                      ["--max_steps", 20, *other])])
        message = str(e.value)
        assert "\n" not in message and ("another model: arch" in message or "--optimizer" in message), message


def ddp_args(data, log_dir, recipe, val_steps):
    return ["--recipe", recipe, "--data_dir", data, "--log_dir", log_dir, *TINY_MODEL, "-B", 2, "-T", 32,
            "--total_batch_size", 256, "--max_steps", 8, "--warmup_steps", 0 if recipe == "speedrun" else 2,
            "--eval_every", 3, "--val_steps", val_steps, "--no-hellaswag", "--no-sample"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["speedrun"])  # DDP is the same for every arch; Muon's step is not AdamW's
def test_two_processes_equal_one_with_double_accumulation(recipe, tmp_path):
    data = str(tmp_path / "data")
    write_shards(data, [5 * 128 + 1, 3 * 128 + 1, 4 * 128 + 1])
    write_shards(data, [4 * 128 + 1], split="val", first_index=0)
    ddp = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train_gpt2.py"), *map(str, ddp_args(data, tmp_path / "ddp", recipe, 2))])
    assert ddp.returncode == 0, ddp.stdout[-2000:] + ddp.stderr[-3000:]
    single = run([sys.executable, os.path.join(REPO, "train_gpt2.py"),
                  *map(str, ddp_args(data, tmp_path / "single", recipe, 4))])
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = read_log(tmp_path / "ddp" / "log.txt"), read_log(tmp_path / "single" / "log.txt")
    assert sorted(a["train"]) == sorted(b["train"]) == list(range(8))
    for kind in ("train", "val"):
        for step, value in b[kind].items():
            # Muon orthogonalises in bf16 (torch's, like the speedrun's): the last fp32 bit of a gradient summed
            # in another order can round to another bf16 value, and that difference grows from step to step
            tol = 1e-2 if recipe == "speedrun" and step >= 2 else 5e-5
            assert a[kind][step] == pytest.approx(value, abs=tol), (kind, step)
