"""Sampling with the KV cache, sample.py, and export to / import from transformers."""

import os

import pytest
import torch
from conftest import main_error, run_script

from machinery.checkpoints import atomic_torch_save
from train_gpt2 import GPT, GPTConfig

CONFIG = GPTConfig(block_size=96, vocab_size=50304, n_layer=3, n_head=4, n_embd=64)


def random_gpt(seed=0):
    """A GPT whose weights are far from init (larger, non-zero biases), so a mis-mapped tensor shows."""
    torch.manual_seed(seed)
    model = GPT(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "model_00100.pt")
    model = random_gpt()
    atomic_torch_save({"model": model.state_dict(), "config": vars(CONFIG), "step": 100}, path)
    return path, model


@pytest.mark.slow
def test_kv_cache_generation_equals_cache_free():
    model = random_gpt()
    idx = torch.randint(0, 50257, (3, 7), generator=torch.Generator().manual_seed(0))
    for top_k, temperature in [(50, 1.0), (None, 0.7), (1, 1.0)]:
        runs = [model.generate(idx, 40, temperature=temperature, top_k=top_k,
                               generator=torch.Generator().manual_seed(5), use_cache=use_cache)
                for use_cache in (True, False)]
        assert runs[0].shape == (3, 47) and torch.equal(runs[0], runs[1]), (top_k, temperature)


def test_kv_cache_states_equal_full_recompute():
    model = random_gpt()
    seq = torch.randint(0, 50257, (2, 60), generator=torch.Generator().manual_seed(1))
    caches = [{} for _ in model.transformer.h]
    with torch.no_grad():
        model.hidden_states(seq[:, :20], caches)  # the prompt
        for t in range(20, 60):  # then one token at a time, and once several
            step = seq[:, t:t + 1]
            got = model.hidden_states(step, caches)[:, -1]
            want = model.hidden_states(seq[:, :t + 1])[:, -1]
            assert (got - want).abs().max().item() < 1e-5, t
        assert caches[0]["k"].shape == (2, 4, 60, 16)
        more = torch.randint(0, 50257, (2, 5))
        got = model.hidden_states(more, caches)
        want = model.hidden_states(torch.cat([seq, more], 1))[:, -5:]
        assert (got - want).abs().max().item() < 1e-5


def test_generation_past_block_size_slides_the_window():
    model = random_gpt()
    idx = torch.randint(0, 50257, (1, 90))
    out = model.generate(idx, 20, top_k=10, generator=torch.Generator().manual_seed(0))  # 110 > block_size 96
    assert out.shape == (1, 110)
    with pytest.raises(ValueError, match="longer than block_size"):
        model.hidden_states(torch.zeros((1, 97), dtype=torch.long))


@pytest.mark.slow
def test_sample_command(checkpoint, enc, capsys):
    import sample

    path, _ = checkpoint
    args = ["-m", path, "--prompt", "Once upon a time", "--num_samples", 3, "--max_new_tokens", 12, "--seed", 7]
    first = run_script("sample.py", *args)
    assert first.returncode == 0, first.stderr
    samples = first.stdout.split("--- sample ")[1:]
    assert len(samples) == 3 and all(s.split("\n", 1)[1].startswith("Once upon a time") for s in samples)
    # seeded: main() again, in this process, writes the same texts; another seed, others
    capsys.readouterr()
    sample.main([str(a) for a in args])
    assert capsys.readouterr().out == first.stdout
    sample.main([str(a) for a in args[:-1]] + ["8"])
    assert capsys.readouterr().out != first.stdout
    assert "checkpoint missing.pt does not exist" in main_error(sample.main, "-m", "missing.pt")


@pytest.mark.slow
def test_export_to_transformers_and_back(checkpoint, tmp_path, enc):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    path, model = checkpoint
    out = tmp_path / "exported"
    proc = run_script("export.py", path, out)
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "vocab.json", "merges.txt", "tokenizer_config.json"} <= set(os.listdir(out))

    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 50257 and hf.config.n_positions == 96 and hf.config.n_layer == 3
    idx = torch.randint(0, 50257, (2, 96), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(idx)[0][..., :50257]  # the padding rows are cut off in the export
        assert (hf(idx).logits - ours).abs().max().item() < 1e-4
        back = GPT.from_pretrained(str(out)).eval()
        assert back.config == GPTConfig(block_size=96, vocab_size=50257, n_layer=3, n_head=4, n_embd=64)
        assert (back(idx)[0] - ours).abs().max().item() < 1e-4

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "Hello world, and Ünïcödé 🚀 too.<|endoftext|>"
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode(text) == enc.encode(text, allowed_special="all")
    assert tokenizer.eos_token_id == 50256

    import export

    assert "is not empty" in main_error(export.main, path, out)


def test_sample_defaults_to_the_newest_checkpoint_in_log(checkpoint, tmp_path, capsys):
    import shutil

    import sample

    path, _ = checkpoint
    os.makedirs(tmp_path / "log")
    shutil.copy(path, tmp_path / "log" / "model_00100.pt")
    shutil.copy(path, tmp_path / "log" / "ckpt_00050.pt")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        sample.main(["--num_samples", "1", "--max_new_tokens", "2", "--device", "cpu"])
        assert capsys.readouterr().out.startswith("model: log/model_00100.pt\n")
        os.rename("log", "elsewhere")
        with pytest.raises(SystemExit) as e:
            sample.main(["--device", "cpu"])
        assert "no checkpoint in log/" in str(e.value) and "\n" not in str(e.value)
    finally:
        os.chdir(cwd)
