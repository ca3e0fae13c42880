"""HellaSwag: rendering, the scoring rule, evaluation across ranks, the command line."""

import hashlib
import itertools
import os
import sys

import pytest
import torch
from conftest import REPO, main_error, run

import hellaswag
from machinery.common import UserError, download_file


@pytest.mark.slow
def test_render_every_val_example(hellaswag_dir, enc):
    n = 0
    for n, example in enumerate(hellaswag.iterate_examples("val", hellaswag_dir), start=1):
        data, tokens, mask, label = hellaswag.render_example(example)
        ctx = enc.encode(example["ctx"])
        ends = [enc.encode(" " + e) for e in example["endings"]]
        width = max(len(ctx) + len(e) for e in ends)
        assert tokens.shape == mask.shape == (4, width) and tokens.dtype == mask.dtype == torch.long
        assert label == data["label"] == example["label"] and data["ctx_tokens"] == ctx
        assert data["ending_tokens"] == ends
        for i, end in enumerate(ends):
            row = ctx + end
            assert tokens[i, :len(row)].tolist() == row and not tokens[i, len(row):].any()
            assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (width - len(row))
    assert n == 10042


def test_first_val_example(hellaswag_dir):
    example = next(hellaswag.iterate_examples("val", hellaswag_dir))
    assert example["ctx"].startswith("A man is sitting on a roof.") and example["label"] == 3


def fixed_loss_logits(tokens, losses_per_row, vocab=50257):
    """Logits under which every scored target of row i costs exactly losses_per_row[i] nats."""
    logits = torch.zeros(tokens.size(0), tokens.size(1), vocab)
    for i, loss in enumerate(losses_per_row):
        # p(target) = e^-loss, the rest spread evenly: a target logit of log((V-1) p / (1 - p))
        p = torch.exp(torch.tensor(-loss, dtype=torch.float64))
        logits[i, torch.arange(tokens.size(1) - 1), tokens[i, 1:]] = torch.log((vocab - 1) * p / (1 - p)).float()
    return logits


def test_scoring_rule_mean_versus_sum():
    # context of 2 tokens; row 0 ends with 1 token, row 1 with 4, rows 2-3 with 2
    tokens = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 8, 9, 10, 11], [5, 6, 12, 13, 0, 0], [5, 6, 14, 15, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]])
    logits = fixed_loss_logits(tokens, [2.0, 1.0, 3.0, 3.0])
    # row 1 has the lowest mean (1.0 per token) but not the lowest sum (4.0 against row 0's 2.0)
    assert hellaswag.score_endings(tokens, mask, logits) == (0, 1)
    # losses on unmasked positions (the context, the padding) do not count
    logits[:, 0] = torch.randn(4, logits.size(-1)) * 10
    logits[0, 3:] = torch.randn(3, logits.size(-1)) * 10
    assert hellaswag.score_endings(tokens, mask, logits) == (0, 1)


def oracle(labels, right=True):
    """A 'model' that knows the answers, one example per call: the gold row (or, if not right, the row
    after it) gets cheap tokens. Its 'hidden states' are already logits; its head is the identity."""
    labels = iter(labels)

    def logits_fn(tokens):
        losses = [5.0] * 4
        label = next(labels)
        losses[label if right else (label + 1) % 4] = 0.5
        return fixed_loss_logits(tokens, losses)

    return hellaswag.Model(logits_fn, lambda x: x, 1024)


def test_evaluate_counts_with_an_oracle(hellaswag_dir):
    labels = [ex["label"] for ex in itertools.islice(hellaswag.iterate_examples("val", hellaswag_dir), 40)]
    r = hellaswag.evaluate(oracle(labels), "cpu", limit=40, batch_tokens=0)
    assert (r.correct_norm, r.correct, r.total) == (40, 40, 40)
    assert r.predictions == {i: (label, label) for i, label in enumerate(labels)}
    r = hellaswag.evaluate(oracle(labels, right=False), "cpu", limit=40, batch_tokens=0)
    assert (r.correct_norm, r.correct, r.total) == (0, 0, 40)


def tiny_gpt(seed=0, block_size=256):
    from train_gpt2 import GPT, GPTConfig

    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)).eval()
    return gpt, hellaswag.Model(gpt.hidden_states, gpt.lm_head, block_size)


def test_scored_position_losses_equal_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    states = torch.randn(8, 12, 16)
    tokens = torch.randint(0, 50, (8, 12))
    mask = torch.zeros(8, 12, dtype=torch.long)
    for row, (start, end) in enumerate([(3, 5), (2, 12), (6, 7), (1, 9)] * 2):
        mask[row, start:end] = 1
    model = hellaswag.Model(lambda t: states, head, 12)
    with torch.no_grad():
        got = hellaswag.scored_position_losses(model, tokens, mask)
        want = hellaswag.completion_losses(tokens, mask, head(states))
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


@pytest.mark.slow
def test_batched_predictions_equal_one_at_a_time(hellaswag_dir):
    """150 real val examples: packed batches (and compiled) pick exactly what one-by-one scoring picks."""
    gpt, model = tiny_gpt()
    one = hellaswag.evaluate(model, "cpu", limit=150, batch_tokens=0)
    batched = hellaswag.evaluate(model, "cpu", limit=150, batch_tokens=8192)
    assert one.total == batched.total == 150 and len(one.predictions) == 150
    assert batched.predictions == one.predictions
    assert batched[:3] == one[:3]
    # many examples per pass, and the wrong ending often cheaper in total than in mean (acc != acc_norm)
    assert len(hellaswag.pack(hellaswag.rendered_examples("val", 0, 1, 150, 256, None), 8192)) < 150 / 5
    assert sum(p != pn for p, pn in one.predictions.values()) > 10
    compiled = hellaswag.Model(torch.compile(gpt.hidden_states, dynamic=True), gpt.lm_head, 256)
    assert hellaswag.evaluate(compiled, "cpu", limit=120, batch_tokens=8192).predictions == \
        {i: p for i, p in one.predictions.items() if i < 120}


def test_evaluate_splits_examples_across_ranks(hellaswag_dir):
    """Rank r of W scores examples r, r+W, ...; summed over ranks the counts equal one process's."""
    _, model = tiny_gpt(block_size=128)  # some examples are longer: their contexts are cropped
    whole = hellaswag.evaluate(model, "cpu", limit=30)
    parts = [hellaswag.evaluate(model, "cpu", rank=r, world_size=3, limit=30) for r in range(3)]
    assert [p.total for p in parts] == [10, 10, 10]
    assert [sum(p[k] for p in parts) for k in range(3)] == list(whole[:3])
    assert {i: v for p in parts for i, v in p.predictions.items()} == whole.predictions


@pytest.mark.slow
def test_command_line_scores_transformers_and_checkpoints(tmp_path, hellaswag_dir, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from machinery.checkpoints import atomic_torch_save
    from train_gpt2 import GPT, GPTConfig

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=256)).save_pretrained(tmp_path / "hf")
    # one process: main() in this one (the same code path, without a fresh interpreter's start-up)
    capsys.readouterr()
    hellaswag.main(["-m", str(tmp_path / "hf"), "-d", "cpu", "--limit", "12"])
    out = capsys.readouterr().out
    assert f"{tmp_path / 'hf'}: 12 examples | acc " in out and "acc_norm 0." in out

    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=32))
    # what scoring reads of a checkpoint: the weights and the config
    atomic_torch_save({"model": model.state_dict(), "config": vars(model.config), "step": 10},
                      str(tmp_path / "model_00010.pt"))
    hellaswag.main(["-m", str(tmp_path / "model_00010.pt"), "--limit", "12"])
    out = capsys.readouterr().out
    assert "12 examples | acc " in out
    # the tests' file is a stand-in: the result says it does not compare with published ones
    assert out.strip().splitlines()[-1] == f"note: {hellaswag.not_the_real_val_set(hellaswag_dir)}"
    single = out.strip().splitlines()[-2].rsplit(" | ", 1)[0]
    # under torchrun the examples are split across ranks and the counts summed
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(REPO, "hellaswag.py"), "-m", str(tmp_path / "model_00010.pt"), "--limit", "12"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-2].rsplit(" | ", 1)[0] == single

    assert "missing.pt does not exist" in main_error(hellaswag.main, "-m", tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    assert "bad.pt is not a readable train_gpt2.py checkpoint" in main_error(hellaswag.main, "-m", tmp_path / "bad.pt")


def test_each_gpt2_size_names_its_own_baselines(tmp_path):
    """hellaswag.py's closing line: OpenAI's GPT-2 of the model's own size and the nearest GPT-3."""
    from machinery.checkpoints import atomic_torch_save
    from train_gpt2 import GPT, GPTConfig

    line = hellaswag.baselines_line((24, 1024))
    assert "OpenAI's GPT-2 355M acc_norm 0.3752" in line and "GPT-3 Medium, 350M 0.436" in line
    assert "1558M acc_norm 0.4889" in hellaswag.baselines_line((48, 1600))
    assert hellaswag.baselines_line((2, 64)) is None and hellaswag.baselines_line(None) is None
    model = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=3, n_head=2, n_embd=32))
    atomic_torch_save({"model": model.state_dict(), "config": vars(model.config), "step": 1},
                      str(tmp_path / "model_00001.pt"))
    assert hellaswag.load_model(str(tmp_path / "model_00001.pt"), "cpu").shape == (3, 32)


def test_offline_download_names_url_and_path(tmp_path, monkeypatch, enc):
    path = str(tmp_path / "hellaswag_val.jsonl")
    url = "http://127.0.0.1:9/hellaswag_val.jsonl"  # nothing listens on the discard port
    with pytest.raises(UserError) as e:
        download_file(url, path)
    assert url in str(e.value) and path in str(e.value)
    assert os.listdir(tmp_path) == []  # no partial file left behind
    # the command line turns it into one line naming the URL and where to put the file
    monkeypatch.setitem(hellaswag.URLS, "val", url)
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["-m", "gpt2", "--cache_dir", str(tmp_path)])
    assert str(e.value).startswith("hellaswag.py: error: could not download " + url)
    assert f"place it at {path}" in str(e.value)


def test_a_damaged_cache_file_is_one_line_naming_it(tmp_path, hellaswag_dir):
    good = open(os.path.join(hellaswag_dir, "hellaswag_val.jsonl")).read()
    for name, text, reason in [("truncated", good[:5000], "is damaged at line 14"), ("empty", "", "is empty"),
                               ("html", "<html><body>rate limited</body></html>\n", "is damaged at line 1")]:
        os.makedirs(tmp_path / name)
        (tmp_path / name / "hellaswag_val.jsonl").write_text(text)
        with pytest.raises(SystemExit) as e:
            hellaswag.main(["-m", "gpt2", "--cache_dir", str(tmp_path / name)])
        assert str(e.value).startswith(f"hellaswag.py: error: {tmp_path / name / 'hellaswag_val.jsonl'} {reason}")
        assert "delete it" in str(e.value)


def test_a_stand_in_val_file_is_told_from_hellaswags_own(tmp_path, hellaswag_dir, monkeypatch):
    """HellaSwag's own val file is known by its size and sha256; any other file (the tests' cleaned stand-in, a
    copy cut short) gets a note, and a file that matches both gets none."""
    note = hellaswag.not_the_real_val_set(hellaswag_dir)
    assert note.startswith(os.path.join(hellaswag_dir, "hellaswag_val.jsonl")) and "do not compare" in note
    assert hellaswag.not_the_real_val_set(str(tmp_path)) is None  # no file yet: nothing to say
    path = os.path.join(hellaswag_dir, "hellaswag_val.jsonl")
    data = open(path, "rb").read()
    monkeypatch.setattr(hellaswag, "REAL_VAL_FILE", (len(data), hashlib.sha256(data).hexdigest()))
    assert hellaswag.not_the_real_val_set(hellaswag_dir) is None
    (tmp_path / "hellaswag_val.jsonl").write_bytes(data[:-1] + b"x")  # the same size, one byte changed
    assert hellaswag.not_the_real_val_set(str(tmp_path)) is not None


def test_a_long_scoring_says_how_long_up_front(capsys):
    """hellaswag.py on a checkpoint scored all 10,042 examples (15 minutes on a 2-core CPU at 124M) with no
    estimate: after its first batch it now says how long the whole will take, when that is a minute or more."""
    hellaswag.announce(10042, 16, 6.0, None)
    assert capsys.readouterr().out == ("HellaSwag: 10,042 examples, about 63 min at the first 16's speed; --limit N "
                                       "scores the first N only (e.g. --limit 1000 for a quick estimate)\n")
    hellaswag.announce(10042, 16, 0.05, None)  # half a minute: no word
    hellaswag.announce(5000, 16, 6.0, 5000)  # --limit given: no advice to give it
    assert capsys.readouterr().out == "HellaSwag: 5,000 examples, about 31 min at the first 16's speed\n"
