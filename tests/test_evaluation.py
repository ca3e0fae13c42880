"""
Every evaluation path runs with autograd off: the training loop's (val loss both ways, HellaSwag, the
samples, CORE), the preflight's timed evaluations, and the scripts' (hellaswag.py, core.py, sample.py, app.py).
One that builds a backward graph holds twice a forward's activation memory on a GPU, from step 0 on.
"""

import argparse
import contextlib
import io
import os
import sys

import pytest
import torch
from conftest import REPO, TINY_MODEL, read_log, run, write_shards


@contextlib.contextmanager
def grad_modes_of_every_forward():
    """The list of torch.is_grad_enabled() at every module forward in this process meanwhile."""
    seen = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, inputs: seen.append(torch.is_grad_enabled()))
    try:
        yield seen
    finally:
        handle.remove()


def tiny_run(tmp_path, core_bundle):
    """A real run's setup, in this process: a tiny GPT on CPU, val loss over --val_tokens, HellaSwag and samples."""
    import train_gpt2
    from machinery import checkpoints

    write_shards(tmp_path / "data", [4000], split="val", first_index=0)
    write_shards(tmp_path / "data", [4000], split="train")
    args = train_gpt2.parse_args(["--data_dir", str(tmp_path / "data"), "--log_dir", str(tmp_path / "log"),
                                  *TINY_MODEL, "-B", "2", "-T", "64", "--total_batch_size", "128", "--max_steps",
                                  "4", "--warmup_steps", "1", "--val_tokens", "384", "--hellaswag_limit", "4",
                                  "--device", "cpu", "--core_every", "2", "--core_max_per_task", "4",
                                  "--core_bundle", core_bundle])
    compute = train_gpt2.compute_init(args)
    inputs = train_gpt2.check_inputs(args, compute)
    with checkpoints.claim_log_dir(args, holder=True) as was_ours, contextlib.redirect_stdout(io.StringIO()):
        run = train_gpt2.setup_run(args, compute, inputs, was_ours)
    return run


@pytest.mark.slow  # the three scripts' models and HellaSwag's rendering: about 18 s
def test_every_evaluation_path_runs_with_grad_disabled(tmp_path, hellaswag_dir, core_bundle, enc):
    import app
    import core
    import hellaswag
    import sample
    import train_gpt2
    from machinery import preflight

    run = tiny_run(tmp_path, core_bundle)
    with grad_modes_of_every_forward() as training:  # the hook sees grad mode: a training step has it on
        train_gpt2.train_step(run, 0, [])
    assert training and all(training)

    paths = {}
    with contextlib.redirect_stdout(io.StringIO()):
        with grad_modes_of_every_forward() as paths["val loss over --val_tokens, HellaSwag, samples"]:
            train_gpt2.evaluate(run, 1)
        run.args.val_tokens = 0
        with grad_modes_of_every_forward() as paths["val loss over --val_steps batches"]:
            train_gpt2.evaluate(run, 1)
        with grad_modes_of_every_forward() as paths["CORE (--core_every)"]:
            train_gpt2.evaluate_core(run, 1)
        with grad_modes_of_every_forward() as paths["the preflight's timed evaluations"]:
            preflight.evaluation_time(train_gpt2, run, 1, argparse.Namespace(**vars(run.args)))
        saved = run.checkpointer.save(1, run.val_loss, last_step=True)
        with grad_modes_of_every_forward() as paths["hellaswag.py"]:
            hellaswag.main(["-m", saved, "--limit", "4", "-d", "cpu"])
        with grad_modes_of_every_forward() as paths["core.py"]:
            core.main(["-m", saved, "--bundle", core_bundle, "--max_per_task", "4", "-d", "cpu"])
        with grad_modes_of_every_forward() as paths["sample.py"]:
            sample.main(["-m", saved, "--num_samples", "1", "--max_new_tokens", "3", "--device", "cpu"])
        with grad_modes_of_every_forward() as paths["app.py"]:
            for _ in app.compare(app.Models([saved], "cpu"), [saved], "Hello", 3, 1.0, 50, 42):
                pass
    for name, modes in paths.items():
        assert modes, f"{name}: no forward pass seen"
        assert not any(modes), f"{name}: {sum(modes)} of {len(modes)} module forwards had grad enabled"


@pytest.mark.slow
def test_ranks_with_unequal_val_batches_finish_with_rotary_buffers(tmp_path):
    """--val_tokens shares 5 rows of T between 2 ranks: 2 and 3, so at -B 2 one rank runs one forward and the
    other two. Under DDP's default broadcast_buffers, each forward that builds a graph re-sends the model's
    buffers (llama's rotary tables, constants) from rank 0, and the second rank's extra forward waited for a
    broadcast that never came: a hang (seen on the code before, with the val loss computed under autograd)."""
    write_shards(tmp_path / "data", [2000], split="val", first_index=0)
    write_shards(tmp_path / "data", [2000], split="train")
    flags = ["--data_dir", tmp_path / "data", "--log_dir", tmp_path / "log", "--arch", "llama", *TINY_MODEL, "-B", 2,
             "-T", 32, "--total_batch_size", 128, "--max_steps", 3, "--warmup_steps", 1, "--eval_every", 2,
             "--val_tokens", 160, "--no-hellaswag", "--no-sample"]
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(REPO, "train_gpt2.py"), *map(str, flags)], timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(read_log(tmp_path / "log" / "log.txt")["val"]) == [0, 2]
