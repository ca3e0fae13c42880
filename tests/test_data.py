"""DataLoaderLite on hand-made shards whose token values tell where each batch came from."""

import collections
import os

import numpy as np
import pytest
import torch
from conftest import write_shards

from machinery.common import UserError
from machinery.speed import DevicePrefetcher
from train_gpt2 import EOT, DataLoaderLite


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
    with pytest.raises(UserError, match="does not exist; download .*--pretokenized fineweb-edu-10B"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"no train shards \(\*_train_\*.npy or .bin\)"):
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


def write_bin(path, tokens, magic=20240520, version=1, count=None):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (magic, version, len(tokens) if count is None else count)
    with open(path, "wb") as f:
        f.write(header.tobytes() + np.asarray(tokens, dtype=np.uint16).tobytes())


def test_llm_c_bin_shards_read_like_npy(tmp_path):
    npy = write_shards(tmp_path / "npy", [300, 170])
    os.makedirs(tmp_path / "bin")
    for path in npy:
        write_bin(tmp_path / "bin" / os.path.basename(path).replace(".npy", ".bin"), np.load(path))
    a = DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "npy"), vocab_size=50304)
    b = DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path / "bin"), vocab_size=50304)
    assert isinstance(b.tokens, np.memmap)
    for _ in range(40):
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch()))


def test_bad_bin_files_are_named(tmp_path):
    cases = {"magic": dict(magic=1234), "version": dict(version=2), "truncated": dict(count=500)}
    for name, kwargs in cases.items():
        os.makedirs(tmp_path / name)
        write_bin(tmp_path / name / "x_train_000001.bin", np.arange(200), **kwargs)
    with pytest.raises(UserError, match="not an llm.c data file"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path / "magic"))
    with pytest.raises(UserError, match="llm.c data version 2"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path / "version"))
    with pytest.raises(UserError, match="has 1,424 bytes, its header promises 2,024: truncated"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path / "truncated"))
    os.makedirs(tmp_path / "vocab")
    write_bin(tmp_path / "vocab" / "x_train_000001.bin", [5, 60000, 7] * 20)  # not GPT-2 tokens
    with pytest.raises(UserError, match="token id 60000, beyond the model's vocabulary of 50304"):
        DataLoaderLite(1, 8, 0, 1, "train", str(tmp_path / "vocab"), vocab_size=50304)


def document_shards(root, doc_lengths_per_shard):
    """Shards of documents [EOT, unique ids...] of the given lengths; from the second shard on, the first
    document has no EOT (it continues the previous shard's last), as in fineweb.py's shards."""
    ids = iter(range(EOT))
    os.makedirs(root, exist_ok=True)
    for i, lengths in enumerate(doc_lengths_per_shard):
        tokens = []
        for j, n in enumerate(lengths):
            continuation = i > 0 and j == 0
            tokens += ([] if continuation else [EOT]) + [next(ids) for _ in range(n if continuation else n - 1)]
        np.save(os.path.join(root, f"edufineweb_train_{i + 1:06d}.npy"), np.array(tokens, dtype=np.uint16))


def epoch_of_batches(loader, steps):
    return [loader.next_batch()[0] for _ in range(steps)]


def test_shuffled_epochs_cover_every_token_once_and_differ(tmp_path):
    B, T, W = 2, 8, 2  # a step reads 32 tokens; each shard holds whole steps + 1
    document_shards(tmp_path, [[5, 9, 3, 16], [11, 7, 15], [6, 6, 6, 6, 9]])  # 33 tokens each
    shard_tokens = [np.load(p) for p in sorted(tmp_path.glob("*.npy"))]
    loaders = [DataLoaderLite(B, T, r, W, "train", str(tmp_path), shuffle=True, seed=7) for r in range(W)]
    epochs = []
    for _ in range(3):
        seen = [torch.cat([x.flatten() for x in epoch_of_batches(loader, 3)]) for loader in loaders]
        epochs.append(torch.cat(seen).tolist())
    for tokens in epochs:
        # inputs cover each shard but its last token (only ever a target), every token once
        missing = collections.Counter(np.concatenate(shard_tokens).tolist()) - collections.Counter(tokens)
        assert sum(missing.values()) == 3 and not collections.Counter(tokens) - collections.Counter(
            np.concatenate(shard_tokens).tolist())
        assert len([t for t in tokens if t != EOT]) == len(set(t for t in tokens if t != EOT))
    assert epochs[0] != epochs[1] != epochs[2]
    plain = DataLoaderLite(B, T, 0, W, "train", str(tmp_path))
    assert torch.cat(epoch_of_batches(plain, 9)).tolist() != torch.cat(epoch_of_batches(loaders[0], 9)).tolist()
    # documents stay whole: each shuffled shard is its documents, reordered
    assert any(sorted(loaders[0].tokens.tolist()) == sorted(s.tolist()) for s in shard_tokens)


def test_shuffle_is_the_same_on_every_rank_and_across_a_resume(tmp_path):
    B, T, W = 2, 8, 2
    document_shards(tmp_path, [[5, 9, 3, 16], [11, 7, 15], [6, 6, 6, 6, 9]])
    single = DataLoaderLite(B * W, T, 0, 1, "train", str(tmp_path), shuffle=True, seed=3)
    ranks = [DataLoaderLite(B, T, r, W, "train", str(tmp_path), shuffle=True, seed=3) for r in range(W)]
    for _ in range(7):
        x = single.next_batch()[0]  # (B*W, T): rank r's rows are r*B .. (r+1)*B
        for r, loader in enumerate(ranks):
            assert torch.equal(loader.next_batch()[0], x[r * B:(r + 1) * B])
    state = ranks[0].state_dict()
    assert state["epoch"] == 2 and state["shuffle"]
    resumed = DataLoaderLite(B, T, 0, W, "train", str(tmp_path), shuffle=True, seed=3)
    resumed.load_state_dict(state)
    for _ in range(10):
        assert torch.equal(resumed.next_batch()[0], ranks[0].next_batch()[0])
    other_seed = DataLoaderLite(B, T, 0, W, "train", str(tmp_path), shuffle=True, seed=4)
    assert any(not torch.equal(other_seed.next_batch()[0], resumed.next_batch()[0]) for _ in range(9))


def test_reset_keeps_the_shard_in_hand(tmp_path):
    """The val loader resets at every evaluation: the same shard is not read and checked again."""
    write_shards(tmp_path, [200], split="val", first_index=0)
    loader = DataLoaderLite(2, 8, 0, 1, "val", str(tmp_path), vocab_size=50304)
    tokens = loader.tokens
    first = loader.next_batch()
    loader.reset()
    assert loader.tokens is tokens and all(torch.equal(a, b) for a, b in zip(first, loader.next_batch()))
    document_shards(tmp_path / "docs", [[5, 9, 3, 16]])
    shuffled = DataLoaderLite(2, 8, 0, 2, "train", str(tmp_path / "docs"), shuffle=True, seed=1)
    epoch0 = shuffled.tokens
    shuffled.next_batch()  # one step per epoch: the next epoch's order is loaded anew
    assert shuffled.epoch == 1 and shuffled.tokens is not epoch0


def test_prefetcher_hands_out_the_same_batches_and_resumes_at_the_one_it_holds(tmp_path):
    """One batch ahead, but its position is the loader's before that batch: a checkpoint taken between two
    batches resumes with the next one the run would have used, across shard ends."""
    write_shards(tmp_path, [100, 57, 33])
    plain = DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path))
    ahead = DevicePrefetcher(DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path)), "cpu")
    for i in range(14):
        expected = plain.state_dict(), plain.next_batch()
        if i in (3, 6, 9):  # in the first, second and third shard
            assert ahead.state_dict() == expected[0]
            resumed = DevicePrefetcher(DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path)), "cpu")
            resumed.load_state_dict(ahead.state_dict())
            assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), expected[1]))
        assert all(torch.equal(a, b) for a, b in zip(ahead.next_batch(), expected[1])), i
    ahead.reset()
    plain.reset()
    assert all(torch.equal(a, b) for a, b in zip(ahead.next_batch(), plain.next_batch()))
    off = DevicePrefetcher(DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path)), "cpu", prefetch=False)
    assert off.state_dict() == DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path)).state_dict()
    assert torch.equal(off.next_batch()[0], DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path)).next_batch()[0])


def test_token_ids_are_checked_batch_by_batch_as_they_are_read(tmp_path):
    """Each batch's slice is checked as it is read (a 200 MB shard is never scanned whole at a shard boundary):
    a bad id deep in the second shard is named when the batch that holds it is read, not before."""
    paths = write_shards(tmp_path, [65, 65])
    bad = np.load(paths[1])
    bad[40] = 60000
    np.save(paths[1], bad)
    loader = DataLoaderLite(2, 8, 0, 1, "train", str(tmp_path), vocab_size=50304)
    for _ in range(4 + 2):  # shard 1's four batches, then shard 2's first two (tokens 0-32)
        loader.next_batch()
    with pytest.raises(UserError, match="edufineweb_train_000002.npy holds token id 60000, beyond the model's"):
        loader.next_batch()
