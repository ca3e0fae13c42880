"""CORE: nanochat's protocol against a plain one-example-at-a-time reference, on a stand-in bundle (core_bundle.py); the
batched, multi-rank and compiled paths against it; the bundle's download and every way it can be damaged."""

import functools
import hashlib
import io
import json
import os
import random
import sys
import zipfile

import jinja2
import pytest
import torch
from conftest import REPO, TINY_MODEL, main_error, main_output, read_log, run
from core_bundle import TASKS, write_bundle
from hub_server import FileServer
from torch.nn import functional as F

import core
import hellaswag

def tiny_gpt(block_size=96, seed=0):
    from train_gpt2 import GPT, GPTConfig

    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=block_size, vocab_size=50304, n_layer=2, n_head=2, n_embd=64)).eval()
    return gpt, hellaswag.Model(gpt.hidden_states, gpt.logits, block_size, (2, 64))


# --- a plain reference: nanochat's protocol one item at a time, the prompts through jinja templates as nanochat
# renders them, full logits, the losses sliced and averaged per row

SHOTS = {"multiple_choice": "{% for ex in shots %}{{ ex.query }}{{ d }}{{ ex.choices[ex.gold] }}\n\n{% endfor %}",
         "schema": "{% for ex in shots %}{{ ex.context_options[ex.gold] }}{{ d }}{{ ex.continuation }}\n\n{% endfor %}",
         "language_modeling": "{% for ex in shots %}{{ ex.context|trim }}{{ d }}{{ ex.continuation }}\n\n{% endfor %}"}


def reference_prompts(kind, item, shots, d):
    head = jinja2.Template(SHOTS[kind]).render(shots=shots, d=d)
    if kind == "multiple_choice":
        return [jinja2.Template("{{ h }}{{ q }}{{ d }}{{ c }}").render(h=head, q=item["query"], d=d, c=c)
                for c in item["choices"]]
    if kind == "schema":
        return [jinja2.Template("{{ h }}{{ c }}{{ d }}{{ x }}").render(h=head, c=c, d=d, x=item["continuation"])
                for c in item["context_options"]]
    prompt = jinja2.Template("{{ h }}{{ c|trim }}{{ d }}").render(h=head, c=item["context"], d=d)
    return [prompt.strip(), prompt + str(item["continuation"])]


def reference_correct(gpt, max_len, kind, item, shots, d, enc):
    rows = [[core.EOT] + enc.encode_ordinary(p) for p in reference_prompts(kind, item, shots, d)]
    if kind == "multiple_choice":
        start = next((i for i in range(min(map(len, rows))) if len({r[i] for r in rows}) > 1), min(map(len, rows)))
        spans = [(start, len(r)) for r in rows]
    elif kind == "schema":
        back = next((i for i in range(min(map(len, rows))) if len({r[-1 - i] for r in rows}) > 1),
                    min(map(len, rows)))
        spans = [(len(r) - back, len(r)) for r in rows]
    else:
        spans, rows = [(len(rows[0]), len(rows[1]))], rows[1:]
    means, hits = [], []
    for r, (s, e) in zip(rows, spans):
        crop = max(0, len(r) - max_len)
        r, s, e = r[crop:], s - crop, e - crop
        tokens = torch.tensor([r])
        with torch.no_grad():
            logits = gpt.logits(gpt.hidden_states(tokens))[0, :, :50257].float()
        losses = F.cross_entropy(logits[:-1], tokens[0, 1:], reduction="none")
        means.append(losses[s - 1:e - 1].mean().item())
        hits.append(bool((logits[s - 1:e - 1].argmax(-1) == tokens[0, s:e]).all()))
    return hits[0] if kind == "language_modeling" else means.index(min(means)) == item["gold"]


def reference_scores(bundle, gpt, max_len, enc, max_per_task=None):
    tasks, items = core.read_bundle(bundle, False)
    out = {}
    for t in tasks:
        data = list(items[t.label])
        random.Random(1337).shuffle(data)
        data = data[:max_per_task] if max_per_task else data
        correct = 0
        for i, item in enumerate(data):
            others = [j for j in range(len(data)) if j != i]
            shots = [data[j] for j in random.Random(1234 + i).sample(others, t.shots)] if t.shots else []
            correct += reference_correct(gpt, max_len, t.kind, item, shots, t.delimiter, enc)
        out[t.label] = correct
    return out


def counts(scores):
    return {s.task.label: s.correct for s in scores}


def test_prompts_few_shot_draws_and_spans_by_hand(enc):
    item = dict(query="Q?", choices=["the cat", "the dog", 7], gold=1)
    shot = dict(query="A?", choices=["x", "y"], gold=0)
    assert core.render_prompts("multiple_choice", item, [shot], "\nAnswer: ") == [
        "A?\nAnswer: x\n\nQ?\nAnswer: the cat", "A?\nAnswer: x\n\nQ?\nAnswer: the dog",
        "A?\nAnswer: x\n\nQ?\nAnswer: 7"]
    lm = dict(context="  so it goes ", continuation="on")
    assert core.render_prompts("language_modeling", lm, [dict(context=" a\n", continuation="b")], " ") == [
        "a b\n\nso it goes", "a b\n\nso it goes on"]
    schema = dict(context_options=["He ran", "She sat"], continuation="fast.", gold=0)
    assert core.render_prompts("schema", schema, [], " ") == ["He ran fast.", "She sat fast."]
    # the draw: seeded by the item's index, never the item itself, the same every time
    data = list(range(6))
    assert core.fewshot_examples(data, 2, 3) == random.Random(1236).sample([0, 1, 3, 4, 5], 3)
    assert all(2 not in core.fewshot_examples(data, 2, k) for k in range(6)) and core.fewshot_examples(data, 0, 0) == []
    # multiple choice scores after the choices' common prefix (" the" here), schema before the common suffix
    task = core.Task("t", "multiple_choice", 0, " ", "t.jsonl", 25.0)
    rows = core.example_rows(task, [dict(item, choices=["the cat", "the dog"])], 0, enc, 1024)
    common = [core.EOT] + enc.encode_ordinary("Q? the")
    assert [r.start for r in core.example_rows(task, [item], 0, enc, 1024)] == [3] * 3  # 7 shares no " the"
    assert [r.tokens[:r.start] for r in rows[:2]] == [common, common] and rows[0].end == len(rows[0].tokens)
    rows = core.example_rows(core.Task("s", "schema", 0, " ", "s.jsonl", 50.0), [schema], 0, enc, 1024)
    assert [r.tokens[r.start:] for r in rows] == [enc.encode_ordinary(" fast.")] * 2
    # a row longer than the model's context loses its first tokens; the span moves with them
    long = dict(context="one two three four five six seven", continuation="eight nine")
    whole = core.example_rows(core.Task("l", "language_modeling", 0, " ", "l.jsonl", 0.0), [long], 0, enc, 1024)[0]
    cut = core.example_rows(core.Task("l", "language_modeling", 0, " ", "l.jsonl", 0.0), [long], 0, enc, 5)[0]
    crop = len(whole.tokens) - 5
    assert cut == core.Row(whole.tokens[crop:], whole.start - crop, whole.end - crop) and cut.start >= 1
    with pytest.raises(ValueError, match="does not fit in 2 tokens"):
        core.example_rows(core.Task("l", "language_modeling", 0, " ", "l.jsonl", 0.0), [long], 0, enc, 2)


def test_centring_and_the_mean():
    assert core.centred(0.25, 25.0) == 0.0 and core.centred(1.0, 62.0) == 1.0
    assert core.centred(0.5, 25.0) == pytest.approx(1 / 3) and core.centred(0.1, 0.0) == pytest.approx(0.1)
    task = functools.partial(core.Task, kind="schema", shots=0, delimiter=" ", uri="x")
    scores = [core.Score(task(label="a", baseline=50.0), 10, 10), core.Score(task(label="b", baseline=25.0), 8, 2)]
    assert core.core_score(scores) == pytest.approx((1.0 + 0.0) / 2)


@pytest.mark.slow  # the reference renders and scores 240 items one row at a time: about 8 s
def test_scores_equal_a_plain_one_at_a_time_reference(core_bundle, enc):
    """Every task type, few-shot and zero-shot, rows cropped to a short context: batched scoring (rows of many
    items per forward, the head only where scored) gets exactly the reference's counts, and so does nanochat's
    way (one item per forward, full logits)."""
    gpt, model = tiny_gpt(block_size=48)
    want = reference_scores(core_bundle, gpt, 48, enc)
    batched = core.evaluate(model, "cpu", core_bundle, False, batch_tokens=4096)
    assert counts(batched) == want
    assert counts(core.evaluate(model, "cpu", core_bundle, False, batch_tokens=0)) == want
    assert [s.examples for s in batched] == [24] * len(TASKS)
    assert 0 < sum(want.values()) < 24 * len(TASKS)  # a random model: some right, some wrong
    # --max_per_task: the first N after nanochat's shuffle, few-shot examples drawn among those N
    assert counts(core.evaluate(model, "cpu", core_bundle, False, max_per_task=10)) == \
        reference_scores(core_bundle, gpt, 48, enc, max_per_task=10)


def test_ranks_share_the_items_and_sum_to_one_process(core_bundle):
    _, model = tiny_gpt()
    whole = counts(core.evaluate(model, "cpu", core_bundle, False))
    parts = [core.evaluate(model, "cpu", core_bundle, False, rank=r, world_size=2) for r in range(2)]
    assert {k: sum(counts(p)[k] for p in parts) for k in whole} == whole


def oracle_model(bundle, enc, max_len=1024):
    """A 'model' that knows the answers: it predicts each next token of a gold row (or of a language modelling
    row) with certainty and is lost on the others. Its hidden states are its logits; its head the identity."""
    tasks, items = core.read_bundle(bundle, False)
    gold = set()
    for t in tasks:
        data = core.task_examples(items[t.label], None)
        for i, item in enumerate(data):
            rows = core.example_rows(t, data, i, enc, max_len)
            gold.add(tuple(rows[0 if t.kind == "language_modeling" else item["gold"]].tokens))

    def hidden(tokens):
        logits = torch.zeros(*tokens.shape, 50257)
        for b, row in enumerate(tokens.tolist()):
            while row[-1] == core.EOT:  # the padding
                row = row[:-1]
            if tuple(row) in gold:
                logits[b, torch.arange(len(row) - 1), row[1:]] = 30.0
        return logits

    return hellaswag.Model(hidden, lambda x: x, max_len)


def test_an_oracle_scores_one_centred(core_bundle, enc):
    scores = core.evaluate(oracle_model(core_bundle, enc), "cpu", core_bundle, False, batch_tokens=600)
    assert all(s.correct == s.examples for s in scores) and core.core_score(scores) == 1.0


@pytest.mark.slow
def test_compiled_scores_equal_eager(core_bundle):
    gpt, model = tiny_gpt()
    eager = counts(core.evaluate(model, "cpu", core_bundle, False))
    compiled = hellaswag.Model(torch.compile(gpt.hidden_states, dynamic=True), gpt.logits, 96)
    assert counts(core.evaluate(compiled, "cpu", core_bundle, False, max_per_task=None, batch_tokens=2048)) == eager


def checkpoint(tmp_path, n_layer=2):
    from machinery.checkpoints import atomic_torch_save
    from train_gpt2 import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=96, vocab_size=50304, n_layer=n_layer, n_head=2, n_embd=64))
    path = str(tmp_path / "model_00010.pt")
    atomic_torch_save({"model": model.state_dict(), "config": vars(model.config), "step": 10}, path)
    return path


@pytest.mark.slow
def test_command_line_table_files_and_two_ranks(tmp_path, core_bundle):
    model = checkpoint(tmp_path)
    out = main_output(core.main, "-m", model, "--bundle", core_bundle, "--out", tmp_path / "core.json")
    lines = out.strip().splitlines()
    assert lines[0].split() == ["task", "type", "shots", "examples", "accuracy", "centred"]
    assert [line.split()[0] for line in lines[1:len(TASKS) + 2]] == [t[0] for t in TASKS] + ["CORE"]
    assert lines[2].split()[:4] == ["mc_three", "multiple_choice", "3", "24"]
    saved = json.loads((tmp_path / "core.json").read_text())
    assert f"CORE {saved['core']:.4f}" in lines[len(TASKS) + 2]
    assert "is not nanochat's bundle" in lines[-1]
    main_output(core.main, "-m", model, "--bundle", core_bundle, "--out", tmp_path / "core.csv", "--max_per_task", 5)
    csv_lines = (tmp_path / "core.csv").read_text().splitlines()
    assert csv_lines[0] == "task,type,shots,examples,accuracy,centred" and csv_lines[-1].startswith("CORE,,,,,")
    assert len(csv_lines) == len(TASKS) + 2 and csv_lines[1].split(",")[3] == "5"
    # under torchrun the items are split across the ranks and the counts summed: the same table
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(REPO, "core.py"), "-m", model, "--bundle", core_bundle])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[:len(TASKS) + 2] == lines[:len(TASKS) + 2]


def test_the_reference_of_the_models_own_size():
    line = core.reference_line((12, 768))
    assert "OpenAI's GPT-2 124M CORE 0.1139" in line and "0.256525 is the time-to-GPT-2 bar" in line
    assert "355M CORE 0.1849" in core.reference_line((24, 1024)) and core.reference_line((2, 64)) is None


def test_damaged_bundles_are_one_line(tmp_path, core_bundle):
    whole = open(core_bundle, "rb").read()
    replaced = tmp_path / "replaced.zip"
    replaced.write_bytes(whole)
    first = core.read_bundle(str(replaced), False)
    assert core.read_bundle(str(replaced), False) is first  # parsed once: core.py checks it, then scores it
    replaced.write_bytes(whole[:len(whole) // 2])  # a damaged copy put in its place is read again, and refused
    assert "replaced.zip is not a whole zip" in main_error(core.main, "--bundle", replaced)
    (tmp_path / "cut.zip").write_bytes(whole[:len(whole) // 2])
    assert "cut.zip is not a whole zip" in main_error(core.main, "--bundle", tmp_path / "cut.zip")
    missing = write_bundle(tmp_path / "missing.zip", drop="schema_two")
    assert "has no eval_bundle/eval_data/commonsense/schema_two.jsonl (task schema_two): the bundle is incomplete" \
        in main_error(core.main, "--bundle", missing)
    odd = write_bundle(tmp_path / "odd.zip", kind_of={"lm_one": "generation_task_with_answers"})
    assert "task lm_one has type 'generation_task_with_answers', which CORE does not score" in \
        main_error(core.main, "--bundle", odd)
    bad = write_bundle(tmp_path / "bad.zip", bad_line="mc_zero")
    assert "reading/mc_zero.jsonl line 4 is not JSON" in main_error(core.main, "--bundle", bad)
    assert "no CORE bundle at" in main_error(core.main, "--bundle", tmp_path / "nothing.zip")
    flipped = bytearray(whole)
    member = zipfile.ZipFile(core_bundle).getinfo("eval_bundle/eval_data/reading/mc_zero.jsonl")
    flipped[member.header_offset + 30 + len(member.filename) + 10] ^= 0x10  # inside its compressed bytes
    (tmp_path / "flipped.zip").write_bytes(bytes(flipped))
    assert "flipped.zip is not a whole zip" in main_error(core.main, "--bundle", tmp_path / "flipped.zip")


def test_the_bundle_is_downloaded_once_and_checked(tmp_path, core_bundle, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "eval_bundle.zip").write_bytes(open(core_bundle, "rb").read())
    digest = hashlib.sha256(open(core_bundle, "rb").read()).hexdigest()
    model, cache = checkpoint(tmp_path), tmp_path / "cache"
    with FileServer(served) as server:
        monkeypatch.setattr(core, "BUNDLE_URL", f"{server.url}/eval_bundle.zip")
        # a file that is not nanochat's bundle (its sha256 differs): refused, and not kept
        assert "is not nanochat's eval bundle (its sha256 differs; removed)" in \
            main_error(core.main, "-m", model, "--cache_dir", cache, "--max_per_task", 4)
        assert os.listdir(cache) == []
        monkeypatch.setattr(core, "BUNDLE_SHA256", digest)  # as if the stand-in were nanochat's own
        out = main_output(core.main, "-m", model, "--cache_dir", cache, "--max_per_task", 4)
    assert f"downloading nanochat's CORE eval bundle to {cache / 'eval_bundle.zip'}" in out and "CORE " in out
    assert "for comparison" not in out and "is not nanochat's" not in out  # not one of GPT-2's sizes
    # the server is gone: the cached core_bundle serves, checked again
    assert "CORE " in main_output(core.main, "-m", model, "--cache_dir", cache, "--max_per_task", 4)
    data = bytearray((cache / "eval_bundle.zip").read_bytes())
    data[len(data) // 2] ^= 1
    (cache / "eval_bundle.zip").write_bytes(bytes(data))
    assert "eval_bundle.zip is damaged (its sha256 is not that of nanochat's eval bundle); delete it" in \
        main_error(core.main, "-m", model, "--cache_dir", cache)
    # offline: one line naming the URL and where to put the file
    monkeypatch.setattr(core, "BUNDLE_URL", "http://127.0.0.1:9/eval_bundle.zip")
    message = main_error(core.main, "-m", model, "--cache_dir", tmp_path / "offline")
    assert "could not download http://127.0.0.1:9/eval_bundle.zip" in message
    assert f"place it at {tmp_path / 'offline' / 'eval_bundle.zip'}" in message


def test_bad_flags(tmp_path, core_bundle, capsys):
    for argv, reason in [(["--max_per_task", "0"], "--max_per_task positive"),
                         (["--out", str(tmp_path / "x.txt")], "name a .csv or a .json file")]:
        with pytest.raises(SystemExit) as e:
            core.main(argv)
        assert e.value.code == 2 and reason in capsys.readouterr().err.strip().splitlines()[-1]
    # fewer items than a task's few-shot examples need
    assert "--max_per_task 3 leaves task mc_three 3 items, and its 3-shot prompts need 4" in \
        main_error(core.main, "-m", checkpoint(tmp_path), "--bundle", core_bundle, "--max_per_task", 3)


def test_table_reads_as_a_table():
    task = core.Task("hellaswag_zeroshot", "multiple_choice", 0, " ", "x", 25.0)
    text = core.table([core.Score(task, 100, 40)])
    assert text.splitlines()[1].split() == ["hellaswag_zeroshot", "multiple_choice", "0", "100", "0.4000", "0.2000"]
    assert text.splitlines()[2].split() == ["CORE", "100", "0.2000"]
    assert io.StringIO(text).read().count("\n") == 2


@pytest.mark.slow
def test_training_logs_core_resumes_with_it_and_plots_it(shakespeare_shards, core_bundle, enc, tmp_path):
    """--core_every: core lines in log.txt beside val (at its steps and the last), kept on resume and drawn by
    plot_log.py against GPT-2's; bits per byte printed after each val loss (not logged: build-nanogpt's format)."""
    import math

    import plot_log
    import train_gpt2

    log_dir = tmp_path / "log"
    args = ["--data_dir", shakespeare_shards, "--log_dir", log_dir, *TINY_MODEL, "-B", 4, "-T", 32,
            "--total_batch_size", 128, "--max_steps", 6, "--warmup_steps", 1, "--eval_every", 3, "--val_steps", 2,
            "--no-hellaswag", "--no-sample", "--core_every", 2, "--core_max_per_task", 6, "--core_bundle", core_bundle,
            "--save_every", 2]
    out = main_output(train_gpt2.main, *args)
    log = read_log(log_dir / "log.txt")
    assert sorted(log["core"]) == [2, 4, 5] and sorted(log["val"]) == [0, 3, 5]
    assert f"CORE: {log['core'][4]:.4f} ({len(TASKS)} tasks, up to 6 examples each)" in out
    assert f"| CORE {log['core'][5]:.4f}" in out.strip().splitlines()[-1]
    assert "not nanochat's bundle as downloaded" in out
    # bits per byte: the val loss over ln 2 times the mean bytes of the val tokens scored (rank 0's 2 batches of 4x32)
    val = train_gpt2.load_tokens(train_gpt2.list_shards(shakespeare_shards, "val")[0])[1:1 + 2 * 4 * 32]
    per_token = sum(len(enc.decode_single_token_bytes(int(t))) for t in val if t != 50256) / len(val)
    bpb = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("validation bits per byte: ")]
    assert len(bpb) == 3 and bpb[0] == pytest.approx(log["val"][0] / (math.log(2) * per_token), abs=2e-4)
    # trained on to step 8: the resumed run keeps the core lines before its first step and logs its own
    args[args.index("--max_steps") + 1] = 9
    out = main_output(train_gpt2.main, *args)
    resumed = read_log(log_dir / "log.txt")
    start = int(out.split("resuming at step ")[1].split()[0])
    before = {s: v for s, v in log["core"].items() if s < start}
    assert before
    assert {s: v for s, v in resumed["core"].items() if s < start} == before
    assert sorted(resumed["core"]) == sorted(set(before) | {6, 8})
    fig, _ = plot_log.plot(str(log_dir), out=str(tmp_path / "curves.png"))
    assert len(fig.axes) == 3 and fig.axes[2].get_title() == "CORE"
    lines = {line.get_label(): line for line in fig.axes[2].get_lines()}
    assert lines["OpenAI GPT-2 124M (nanochat's measurement)"].get_ydata()[0] == 0.1139
    (points,) = [line for label, line in lines.items() if label.endswith(": CORE")]
    assert list(points.get_xdata()) == sorted(resumed["core"])
    assert list(points.get_ydata()) == [resumed["core"][s] for s in sorted(resumed["core"])]
