"""DataLoaderLite on hand-made shards whose token values tell where each batch came from."""

import os

import numpy as np
import pytest
import torch
from conftest import write_shards

from train_gpt2 import DataLoaderLite, UserError


def build_nanogpt_stream(shards, B, T, steps):
    """
    The single-process batch sequence of build-nanogpt's loader, stated plainly: walk each
    shard in chunks of B*T (plus one target token), go to the next shard (wrapping around)
    when a further chunk would not fit.
    """
    out, shard, pos = [], 0, 0
    for _ in range(steps):
        tokens = np.load(shards[shard]).astype(np.int64)
        chunk = torch.from_numpy(tokens[pos:pos + B * T + 1])
        out.append((chunk[:-1].view(B, T), chunk[1:].view(B, T)))
        pos += B * T
        if pos + B * T + 1 > len(tokens):
            shard, pos = (shard + 1) % len(shards), 0
    return out


def test_one_process_matches_build_nanogpt_across_shards_and_wraparound(tmp_path):
    B, T = 2, 8
    shards = write_shards(tmp_path, [100, 57, 33, 80])  # chunk counts 6, 3, 2, 4; ragged ends
    loader = DataLoaderLite(B, T, 0, 1, "train", str(tmp_path))
    steps = 2 * (6 + 3 + 2 + 4) + 5  # twice round, and into a third lap
    for i, (ex, ey) in enumerate(build_nanogpt_stream(shards, B, T, steps)):
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
        assert torch.equal(x, ex) and torch.equal(y, ey), f"batch {i}"
    loader.reset()
    x, _ = loader.next_batch()
    assert torch.equal(x, build_nanogpt_stream(shards, B, T, 1)[0][0])


def test_targets_are_inputs_shifted_by_one(tmp_path):
    write_shards(tmp_path, [200])
    loader = DataLoaderLite(4, 16, 0, 1, "train", str(tmp_path))
    x, y = loader.next_batch()
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])


def test_ranks_interleave_like_one_big_process(tmp_path):
    """With shard lengths that hold whole steps, W ranks read exactly the single-process chunks, interleaved."""
    B, T, W = 2, 8, 3
    shards = write_shards(tmp_path, [3 * B * T * W + 1, 2 * B * T * W + 1])
    single = build_nanogpt_stream(shards, B, T, 2 * 5 * W)
    loaders = [DataLoaderLite(B, T, r, W, "train", str(tmp_path)) for r in range(W)]
    for step in range(2 * 5):
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            ex, ey = single[step * W + r]
            assert torch.equal(x, ex) and torch.equal(y, ey), (step, r)


def test_ranks_change_shard_together_on_ragged_shards(tmp_path):
    """build-nanogpt's rank-dependent end check let rank 0 move on while rank 1 stayed; here they never split."""
    B, T, W = 2, 8, 2
    write_shards(tmp_path, [80, 101, 49])
    loaders = [DataLoaderLite(B, T, r, W, "train", str(tmp_path)) for r in range(W)]
    seen = set()
    for _ in range(40):
        batches = [loader.next_batch() for loader in loaders]
        shards = {loader.current_shard for loader in loaders}
        assert len(shards) == 1
        # rank 1's chunk starts right where rank 0's ends, in the same shard
        x0, x1 = batches[0][0].flatten(), batches[1][0].flatten()
        assert x1[0].item() == x0[-1].item() + 1
        seen.add(x0[0].item() // 1000)  # which shard the step read
    assert seen == {0, 1, 2}


def test_shards_are_memory_mapped_and_sorted(tmp_path):
    write_shards(tmp_path, [50, 50], first_index=1)
    write_shards(tmp_path, [50], first_index=0, split="val")
    open(os.path.join(tmp_path, "edufineweb_train_000003.npy.tmp"), "wb").close()  # a write in progress
    loader = DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path))
    assert [os.path.basename(s) for s in loader.shards] == ["edufineweb_train_000001.npy",
                                                            "edufineweb_train_000002.npy"]
    assert isinstance(loader.tokens, np.memmap)
    val = DataLoaderLite(1, 8, 0, 1, "val", str(tmp_path))
    assert [os.path.basename(s) for s in val.shards] == ["edufineweb_val_000000.npy"]


def test_a_shard_too_short_for_one_step_is_skipped(tmp_path):
    """fineweb.py's last shard is partial; one shorter than a step could never be read, so it is left out."""
    shards = write_shards(tmp_path, [100, 57, 20])
    loader = DataLoaderLite(2, 8, 0, 2, "train", str(tmp_path))  # a step needs 2*8*2+1 = 33 tokens
    assert loader.shards == shards[:2] and loader.skipped == shards[2:]
    for _ in range(10):
        x, _ = loader.next_batch()
        assert x[0, 0].item() // 1000 in (0, 1)


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="does not exist; run `python fineweb.py`"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"no train shards \(\*_train_\*.npy\)"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path))

    write_shards(tmp_path / "small", [16])
    with pytest.raises(UserError, match="every train shard .* is shorter than one batch, B\\*T\\*processes\\+1 = 17"):
        DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "small"))

    write_shards(tmp_path / "wide", [100], dtype=np.int32)
    with pytest.raises(UserError, match="holds int32"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path / "wide"))

    (path,) = write_shards(tmp_path / "cut", [1000])
    with open(path, "r+b") as f:
        f.truncate(500)  # an interrupted copy
    with pytest.raises(UserError, match="unreadable.*rerun `python fineweb.py`"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path / "cut"))

    os.makedirs(tmp_path / "junk")
    with open(tmp_path / "junk" / "x_train_000001.npy", "wb") as f:
        f.write(b"not a numpy file at all")
    with pytest.raises(UserError, match="unreadable"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path / "junk"))
