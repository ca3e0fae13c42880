"""
FSDP2 for train_gpt2.py's --fsdp, through torch's own engine (torch.distributed.fsdp.fully_shard).

Each Block, then the GPT around them (the embeddings, the final norm and the tied head), is wrapped with
fully_shard: every rank keeps 1/N of each weight, its gradient and its optimizer moments as DTensors
(DDP keeps all of them on every rank), and a block's whole weights exist only while it computes. The
rest is what the training loop and the checkpoints need from that: the whole model on every rank for an
evaluation, moving between a rank's shards and the whole tensors a .pt checkpoint holds, and the sharded
checkpoints' reads and writes (torch.distributed.checkpoint).

torch.distributed.fsdp, .tensor and .checkpoint are imported inside the functions that use them, on purpose:
importing them costs every process about a second at start (measured: `python -c "import
torch.distributed.tensor"` 4.8 s against 3.3 s for torch alone, beside a test run), and only --fsdp runs and
sharded checkpoints need them. Until one is imported, no module is sharded and no tensor is a DTensor.
"""

import contextlib
import sys
import warnings

import torch
import torch.distributed as dist


def shard_model(model, compile_mode=None):
    """Shard `model` in place, block by block, then its root. The precision is DDP's: the weights stay fp32,
    gathered and reduced in fp32, and bf16 autocast (on GPUs) casts them for each matmul, so embeddings, norm
    gains and the residual stream stay fp32 as they do under DDP. (FSDP's MixedPrecisionPolicy with bf16
    weights would halve the gathers' traffic, but it applies to the root too and casts each block's input:
    the whole residual stream would become bf16, another recipe.) compile_mode: torch.compile each block (the
    hooks that gather and free the weights stay outside the compiled graphs). Returns the model."""
    from torch.distributed.fsdp import fully_shard  # (see the module's docstring)

    for block in model.transformer.h:
        if compile_mode is not None:
            block.compile(mode=compile_mode)  # in place: the parameter names stay those of the plain model
        fully_shard(block)
    fully_shard(model)
    return model


def is_sharded(model):
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def is_dtensor(tensor):
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(tensor, dtensor.DTensor)


@contextlib.contextmanager
def gathered(model):
    """Every rank holds the whole model (in the compute dtype) until the block ends, so that evaluation can
    run a different number of forward passes on each rank (HellaSwag's shares, rank 0's samples) without a
    collective per pass. A plain model: nothing to do."""
    if not is_sharded(model):
        yield
        return
    modules = [m for m in model.modules() if is_sharded(m)]
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            # FSDP's own defaults again: the blocks free their whole weights after forward, the root keeps
            # them (the backward needs them at once)
            m.set_reshard_after_forward(m is not model, recurse=False)


def local(tensor):
    """This rank's part of a tensor: a DTensor's local shard, a plain tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_tensors(obj, memo=None):
    """obj (a state dict, nested in dicts, lists and tuples) with every DTensor gathered whole onto the CPU;
    a collective: every rank calls it, in the same order. A tensor met twice (the tied wte/lm_head weight in
    state_dict(keep_vars=True), which holds the parameters themselves) is gathered once and stays one tensor,
    so torch.save writes it once, as it does for a plain model."""
    memo = {} if memo is None else memo
    if is_dtensor(obj):
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
    if not is_dtensor(param):
        return tensor
    from torch.distributed.tensor import distribute_tensor  # (imported already: param is a DTensor)

    return distribute_tensor(tensor.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                             src_data_rank=None)


# -----------------------------------------------------------------------------
# Sharded checkpoints: torch.distributed.checkpoint, keyed by parameter name, so any world size reads them


def sharded_state(model, optimizers):
    """{"model", "optimizer"}: the weights and the optimizer's state (of one torch optimizer or a list of
    them) keyed by parameter name, each rank's shards as DTensors (plain tensors for a plain model); the
    optimizer's state is made first if it has none yet, for a load to fill."""
    # (slow to import: see the module's docstring)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizers)}


def save_sharded(state, folder):
    """Every rank writes its shards of `state` into folder (a collective)."""
    import torch.distributed.checkpoint as dcp  # (slow to import: see the module's docstring)

    dcp.save(state, checkpoint_id=folder)


def checkpoint_errors():
    """What a sharded save or load raises for a fault on any rank: torch.distributed.checkpoint gathers them into a
    CheckpointException, which derives from BaseException (so `except Exception` never sees it); and the rest."""
    from torch.distributed.checkpoint.api import CheckpointException  # (slow to import: see the module's docstring)

    return Exception, CheckpointException


def load_sharded(model, optimizers, folder):
    """Fill the model and the optimizer(s) from a sharded folder, at this run's world size and layout (a single
    process without a process group reads every shard itself)."""
    import torch.distributed.checkpoint as dcp  # (slow to import: see the module's docstring)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict  # (same)

    state = sharded_state(model, optimizers)
    with warnings.catch_warnings():  # torch warns when it reads in one process: here that is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizers, state["optimizer"])


def read_whole_weights(folder):
    """The model's whole tensors from a sharded folder, in this one process: each is made empty at the size
    its metadata records, then torch.distributed.checkpoint fills it from the shards."""
    import torch.distributed.checkpoint as dcp  # (slow to import: see the module's docstring)

    reader = dcp.FileSystemReader(folder)
    entries = reader.read_metadata().state_dict_metadata
    model = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
             if k.startswith("model.")}
    with warnings.catch_warnings():  # (as in load_sharded)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model
