"""The repo's layout: the scripts at the top, the recipe in train_gpt2.py, what they only import in
machinery/, honest imports with no cycle, and checkpoints written before the split still resuming."""

import ast
import glob
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, main_output

import train_gpt2
from machinery.checkpoints import load_checkpoint
from train_gpt2 import GPT

FIXTURES = os.path.join(REPO, "tests", "fixtures")
SCRIPTS = ["app", "core", "export", "fineweb", "hellaswag", "plot_log", "sample", "train_gpt2", "variants"]
PACKAGE = "machinery"


def source_files():
    """{module name: path} of the project's code: the scripts at the top and the machinery package."""
    files = {name: os.path.join(REPO, f"{name}.py") for name in SCRIPTS}
    for f in os.listdir(os.path.join(REPO, PACKAGE)):
        if f.endswith(".py") and f != "__init__.py":
            files[f"{PACKAGE}.{f[:-3]}"] = os.path.join(REPO, PACKAGE, f)
    return files


def project_imports(nodes, modules):
    """The project modules that these import statements bring in."""
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # from machinery import speed
    return names & set(modules)


def test_the_top_level_holds_the_scripts_and_the_package_the_rest():
    """Every .py at the top is a script a user runs (or variants.py, the lesson's second part), and has main()
    or is imported by one; what is only imported lives in machinery/."""
    top = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py"))
    assert top == SCRIPTS
    for name in SCRIPTS:
        with open(os.path.join(REPO, f"{name}.py")) as f:
            tree = ast.parse(f.read())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name == "variants" or "main" in defined, name


def test_no_import_cycle():
    files = source_files()
    graph = {}
    for module, path in files.items():
        with open(path) as f:
            graph[module] = project_imports(ast.parse(f.read()).body, files)
    assert graph["train_gpt2"] >= {"machinery.checkpoints", "machinery.speed", "machinery.common"}

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        for dep in graph[module]:
            visit(dep, path + [module])

    for m in graph:
        visit(m, [])


def test_imports_inside_functions_say_why():
    """Imports go at the top; the few inside functions (an optional dependency, a slow one, a cycle) carry a
    comment on their line or the line before saying why."""
    unexplained = []
    for path in [*source_files().values(), *glob.glob(os.path.join(REPO, "benchmarks", "*.py"))]:
        with open(path) as f:
            source = f.read()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        here, before = lines[inner.lineno - 1], lines[inner.lineno - 2]
                        if "#" not in here and "#" not in before:
                            unexplained.append(f"{os.path.relpath(path, REPO)}:{inner.lineno}: {here.strip()}")
    assert not unexplained, unexplained


@pytest.mark.slow
@pytest.mark.parametrize("script, beside", [("fineweb.py", ["machinery"]),
                                            ("hellaswag.py", ["machinery", "variants.py"])])
def test_fineweb_and_hellaswag_run_with_what_the_readme_says_beside_them(tmp_path, script, beside):
    """Copied into an empty folder with the README's list beside it, each script starts (--help), and
    importing it loads no other file of the project."""
    for name in [script, *beside]:
        copy = shutil.copytree if os.path.isdir(os.path.join(REPO, name)) else shutil.copy
        copy(os.path.join(REPO, name), tmp_path / name)
    proc = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr
    code = (f"import sys; import {script[:-3]}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'machinery', 'variants', 'train_gpt2', "
            "'fineweb', 'hellaswag', 'sample'}))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert {m.split(".")[0] for m in eval(loaded.stdout)} == {script[:-3], *(b.removesuffix(".py") for b in beside)}


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


# the model config's fields added since each fixture was written, and the values they take on resume
SPEEDRUN_SIMPLE_FIELDS = {"bias": False, "rotary": "full", "attn_scale": 0.0, "embed_norm": False,
                          "logit_softcap": 0.0}
FIXTURE_RUNS = {"old_layout": ([], {"arch": "gpt2", "untie_head": False, **SPEEDRUN_SIMPLE_FIELDS}),
                "llama": (["--recipe", "llama"], SPEEDRUN_SIMPLE_FIELDS),
                "speedrun": (["--recipe", "speedrun"], SPEEDRUN_SIMPLE_FIELDS)}


@pytest.mark.slow
@pytest.mark.parametrize("fixture", list(FIXTURE_RUNS))
def test_checkpoint_from_before_the_split_resumes(fixture, tmp_path):
    """tests/fixtures holds ckpt_00006.pt and the whole run's log.txt of one run, written by train_gpt2.py as
    it was before the recipe and its machinery were split (commit de45c53), and of the same run with --recipe
    llama and speedrun, written before the model config gained speedrun-simple's fields (commit c9c8d83).
    Resumed by today's code with the same command, each run writes its log again, and today's checkpoints keep
    the same layout."""
    flags, added = FIXTURE_RUNS[fixture]
    data, log_dir = tmp_path / "shards", tmp_path / "run"
    write_old_layout_shards(data)
    os.makedirs(log_dir)
    shutil.copy(os.path.join(FIXTURES, f"{fixture}_ckpt_00006.pt"), log_dir / "ckpt_00006.pt")
    with open(os.path.join(FIXTURES, f"{fixture}_log.txt")) as f:  # as if killed during step 8
        (log_dir / "log.txt").write_text("".join(line for line in f if int(line.split()[0]) < 8))
    out = main_output(train_gpt2.main, "--data_dir", data, "--log_dir", log_dir, *OLD_LAYOUT_RUN, *flags)
    assert "resuming at step 6" in out

    def rows(path):
        with open(path) as f:
            return [line.split() for line in f]

    got, want = rows(log_dir / "log.txt"), rows(os.path.join(FIXTURES, f"{fixture}_log.txt"))
    assert [r[:2] for r in got] == [r[:2] for r in want]
    # byte-identical on the machine that wrote the fixture; a tolerance for other CPUs' last bits
    for (step, kind, value), (_, _, old) in zip(got, want):
        assert float(value) == pytest.approx(float(old), abs=5e-5), (step, kind)

    old, new = load_checkpoint(log_dir / "ckpt_00006.pt"), load_checkpoint(log_dir / "model_00011.pt")
    # what was saved is saved as it was; later versions only add (data fingerprints, a checksum)
    assert set(old) <= set(new) and {k: new["config"][k] for k in old["config"]} == old["config"]
    # fields GPTConfig gained since (issue 11's arch, issue 24's knobs) were filled with their defaults on resume
    assert {k: v for k, v in new["config"].items() if k not in old["config"]} == added
    assert set(new["data"]["train"]) == set(old["data"]["train"]) and set(new["rng"]) == set(old["rng"])
    model = GPT.from_pretrained(str(log_dir / "ckpt_00006.pt"))
    assert model.config.n_embd == 8 and model.config.vocab_size == 64
    assert torch.equal(model.lm_head.weight, old["model"]["lm_head.weight"])
