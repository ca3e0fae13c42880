"""The repo's layout: the recipe in train_gpt2.py, its machinery beside it, no import cycles, and
checkpoints written before the split still resuming."""

import ast
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_script

from checkpoints import load_checkpoint
from train_gpt2 import GPT

PROJECT_MODULES = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py"))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


def module_level_imports(module):
    """The project modules that `module` imports at its top level (not inside functions)."""
    with open(os.path.join(REPO, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(PROJECT_MODULES)


def test_fineweb_and_hellaswag_load_alone():
    """Importing them brings in no other file of the project: they are scripts that stand alone."""
    code = (f"import sys; sys.path.insert(0, {REPO!r}); import fineweb, hellaswag; "
            f"print(sorted(m for m in sys.modules if m in {PROJECT_MODULES!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fineweb', 'hellaswag']"


def test_no_import_cycle():
    graph = {m: module_level_imports(m) for m in PROJECT_MODULES}
    assert graph["train_gpt2"] >= {"checkpoints", "speed", "hf_convert", "common"}  # the parser sees imports

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        for dep in graph[module]:
            visit(dep, path + [module])

    for m in PROJECT_MODULES:
        visit(m, [])


def test_train_gpt2_reads_like_the_lecture():
    """The loop within the first ~700 lines, and no function longer than ~80 lines."""
    with open(os.path.join(REPO, "train_gpt2.py")) as f:
        source = f.read()
    loop_line = next(i for i, line in enumerate(source.splitlines(), 1) if line.strip().startswith("for step in"))
    assert loop_line < 700, loop_line
    longest = max((node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(ast.parse(source))
                  if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    assert longest[0] <= 80, longest


def write_old_layout_shards(root):
    """The shards the fixture was trained on: 3,000 tokens each (val, train, train) over 64 ids. Each token's
    successor is fixed, except every 8th, picked by a linear congruential generator (no numpy RNG, whose
    streams may change between versions)."""
    os.makedirs(root, exist_ok=True)
    state = 12345
    for i, split in enumerate(["val", "train", "train"]):
        tokens = np.empty(3000, dtype=np.uint16)
        for j in range(3000):
            state = (state * 1103515245 + 12345) % 2 ** 31
            tokens[j] = (state >> 16) % 64 if j % 8 == 0 else (int(tokens[j - 1]) * 37 + 11) % 64
        np.save(os.path.join(root, f"edufineweb_{split}_{i:06d}.npy"), tokens)


OLD_LAYOUT_RUN = ["--n_layer", 1, "--n_head", 2, "--n_embd", 8, "--block_size", 16, "--vocab_size", 64, "-B", 2,
                  "-T", 16, "--total_batch_size", 64, "--max_steps", 12, "--warmup_steps", 2, "--max_lr", 1e-2,
                  "--eval_every", 4, "--val_steps", 1, "--save_every", 6, "--checkpoint_every", 100,
                  "--no-hellaswag", "--no-sample", "--seed", 5]


@pytest.mark.slow
def test_checkpoint_from_before_the_split_resumes(tmp_path):
    """tests/fixtures holds ckpt_00006.pt and the whole run's log.txt, both written by train_gpt2.py as it
    was before the recipe and its machinery were split (commit de45c53). Resumed by today's code, the run
    writes that log again, and today's checkpoints keep the same layout."""
    data, log_dir = tmp_path / "shards", tmp_path / "run"
    write_old_layout_shards(data)
    os.makedirs(log_dir)
    shutil.copy(os.path.join(FIXTURES, "old_layout_ckpt_00006.pt"), log_dir / "ckpt_00006.pt")
    with open(os.path.join(FIXTURES, "old_layout_log.txt")) as f:  # as if killed during step 8
        (log_dir / "log.txt").write_text("".join(line for line in f if int(line.split()[0]) < 8))
    proc = run_script("train_gpt2.py", "--data_dir", data, "--log_dir", log_dir, *OLD_LAYOUT_RUN)
    assert proc.returncode == 0, proc.stderr
    assert "resuming at step 6" in proc.stdout

    def rows(path):
        with open(path) as f:
            return [line.split() for line in f]

    got, want = rows(log_dir / "log.txt"), rows(os.path.join(FIXTURES, "old_layout_log.txt"))
    assert [r[:2] for r in got] == [r[:2] for r in want]
    # byte-identical on the machine that wrote the fixture; a tolerance for other CPUs' last bits
    for (step, kind, value), (_, _, old) in zip(got, want):
        assert float(value) == pytest.approx(float(old), abs=5e-5), (step, kind)

    old, new = load_checkpoint(log_dir / "ckpt_00006.pt"), load_checkpoint(log_dir / "model_00011.pt")
    # what was saved is saved as it was; later versions only add (data fingerprints, a checksum)
    assert set(old) <= set(new) and {k: new["config"][k] for k in old["config"]} == old["config"]
    # fields GPTConfig gained since (issue 11's arch) were filled with their defaults on resume
    assert {k: v for k, v in new["config"].items() if k not in old["config"]} == {"arch": "gpt2", "untie_head": False}
    assert set(new["data"]["train"]) == set(old["data"]["train"]) and set(new["rng"]) == set(old["rng"])
    model = GPT.from_pretrained(str(log_dir / "ckpt_00006.pt"))
    assert model.config.n_embd == 8 and model.config.vocab_size == 64
    assert torch.equal(model.lm_head.weight, old["model"]["lm_head.weight"])
