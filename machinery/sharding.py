"""
FSDP2 for train_gpt2.py's --fsdp, through torch's own engine (torch.distributed.fsdp.fully_shard).

Each Block, then the GPT around them (the embeddings, the final norm and the tied head), is wrapped with
fully_shard: every rank keeps 1/N of each weight, its gradient and its optimizer moments as DTensors
(DDP keeps all of them on every rank), and a block's whole weights exist only while it computes. The
rest is what the training loop and the checkpoints need from that: the whole model on every rank for an
evaluation, and moving between a rank's shards and the whole tensors a .pt checkpoint holds.
"""

import contextlib

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_model(model, dtype, compile_mode=None):
    """Shard `model` in place, block by block, then its root. With bf16 (autocast's dtype on GPUs) the
    weights are gathered in bf16 for compute and the gradients reduced in fp32, while the shards the
    optimizer steps stay fp32. compile_mode: torch.compile each block (the hooks that gather and free the
    weights stay outside the compiled graphs). Returns the model."""
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bf16" \
        else MixedPrecisionPolicy()
    for block in model.transformer.h:
        if compile_mode is not None:
            block.compile(mode=compile_mode)  # in place: the parameter names stay those of the plain model
        fully_shard(block, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    return model


def is_sharded(model):
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """Every rank holds the whole model (in the compute dtype) until the block ends, so that evaluation can
    run a different number of forward passes on each rank (HellaSwag's shares, rank 0's samples) without a
    collective per pass. A plain model: nothing to do."""
    if not is_sharded(model):
        yield
        return
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def local(tensor):
    """This rank's part of a tensor: a DTensor's local shard, a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_tensors(obj, memo=None):
    """obj (a state dict, nested in dicts, lists and tuples) with every DTensor gathered whole onto the CPU;
    a collective: every rank calls it, in the same order. A tensor met twice (the tied wte/lm_head weight in
    state_dict(keep_vars=True), which holds the parameters themselves) is gathered once and stays one tensor,
    so torch.save writes it once, as it does for a plain model."""
    memo = {} if memo is None else memo
    if isinstance(obj, DTensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().full_tensor().cpu()
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: full_tensors(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_tensors(v, memo) for v in obj)
    return obj


def shard_like(tensor, param):
    """A whole tensor (from a .pt checkpoint) cut to this rank's shard, laid out as `param` is; each rank
    takes its own part of the copy it holds, without communicating. A plain param: the tensor as it is."""
    if not isinstance(param, DTensor):
        return tensor
    return distribute_tensor(tensor.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                             src_data_rank=None)
