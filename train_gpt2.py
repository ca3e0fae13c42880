"""
Train GPT-2 (124M) from scratch on FineWeb-Edu, the way OpenAI's paper describes it.

    python fineweb.py                                        # make the token shards first
    python train_gpt2.py                                     # one device
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # 8 GPUs on one node

The file reads top to bottom: the model, the data loader, the optimizer and its
learning-rate schedule, evaluation, checkpoints, and finally the training loop.
Nothing runs at import time; `main()` does the work.
"""

import argparse
import contextlib
import glob
import inspect
import math
import os
import pickle
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file); printed as one line, no traceback."""


def first_line(e):
    """The first line of an exception's message, for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_hf_gpt2(name_or_path):
    """transformers' GPT2LMHeadModel from the hub or a save_pretrained directory."""
    from transformers import GPT2LMHeadModel  # imported here: slow, and only needed for OpenAI's weights

    try:
        return GPT2LMHeadModel.from_pretrained(name_or_path)
    except OSError as e:
        raise UserError(f"could not load {name_or_path!r} with transformers ({first_line(e)}); "
                        "with no network, pass a local directory saved by save_pretrained") from None


# -----------------------------------------------------------------------------
# The model: GPT-2 exactly (pre-LayerNorm blocks, learned positions, tied embeddings)


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise UserError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        # query, key and value for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # this projection adds into the residual stream
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        # flash attention: the (T, T) attention matrix is never written to memory
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # the approximation GPT-2 was trained with
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        # pre-norm: the residual stream itself is never normalised, only what branches off it
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the input embedding and the output projection are one matrix
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # each block adds twice into the residual stream; keep its variance from growing with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample `max_new_tokens` tokens after each row of `idx` (B, T); returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / temperature
            probs = F.softmax(logits, dim=-1)
            if top_k is not None:
                # sample among the k most likely tokens only, renormalised by multinomial
                probs, candidates = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)
                choice = torch.multinomial(probs, 1, generator=generator)
                next_token = torch.gather(candidates, -1, choice)
            else:
                next_token = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, next_token), dim=1)
        return idx

    def num_params(self, non_embedding=True):
        """Parameter count; the tied wte/lm_head matrix is counted once, wpe left out by default."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T."""
        cfg = self.config
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        return 6 * self.num_params() + 12 * L * H * Q * T

    @classmethod
    def from_pretrained(cls, name_or_path):
        """Load OpenAI's GPT-2 weights (or any transformers GPT-2 checkpoint directory) into this model."""
        hub_names = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
        if name_or_path not in hub_names and not os.path.isdir(name_or_path):
            raise UserError(f"--model {name_or_path!r} is neither one of {', '.join(hub_names)} "
                            "nor a directory holding a transformers GPT-2 checkpoint")
        hf_model = load_hf_gpt2(name_or_path)
        hf = hf_model.config
        if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or hf.n_inner not in (None, 4 * hf.n_embd) \
                or hf.layer_norm_epsilon != 1e-5:
            raise UserError(f"{name_or_path}: only the GPT-2 architecture is supported (tanh GELU, 4x MLP, "
                            f"LayerNorm eps 1e-5); got {hf.activation_function}, n_inner={hf.n_inner}, "
                            f"eps={hf.layer_norm_epsilon}")
        config = GPTConfig(block_size=hf.n_positions, vocab_size=hf.vocab_size,
                           n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd)
        model = cls(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf_model.state_dict().items()
                 if not k.endswith((".attn.masked_bias", ".attn.bias"))}  # causal-mask buffers, not weights
        if set(sd_hf) != set(sd):
            raise UserError(f"{name_or_path}: parameter names differ from GPT-2's: "
                            f"{sorted(set(sd_hf) ^ set(sd))[:4]}")
        # OpenAI's checkpoints use a Conv1D module, which stores these weights as (in, out)
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k, v in sd_hf.items():
                sd[k].copy_(v.t() if k.endswith(transposed) else v)
        return model


# -----------------------------------------------------------------------------
# Data: token shards written by fineweb.py (build-nanogpt's format: a uint16 .npy per shard)


def list_shards(data_root, split):
    """The shard files of one split, sorted by name, as build-nanogpt's loader orders them."""
    if not os.path.isdir(data_root):
        raise UserError(f"data directory {data_root!r} does not exist; run `python fineweb.py` to make it, "
                        "or point --data_dir at your shards")
    shards = sorted(glob.glob(os.path.join(data_root, f"*_{split}_*.npy")))
    if not shards:
        raise UserError(f"no {split} shards (*_{split}_*.npy) in {data_root!r}; run `python fineweb.py`, "
                        "or point --data_dir at your shards")
    return shards


def load_tokens(path):
    """Memory-map one shard: only the slices a batch touches are read from disk."""
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"shard {path} is unreadable ({e}); delete it and rerun `python fineweb.py`") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, expected a 1-D uint16 "
                        "array as fineweb.py writes")
    return tokens


class DataLoaderLite:
    """
    Hands out (B, T) batches of consecutive tokens. Rank r of W reads the r-th of W
    adjacent B*T chunks, so together the ranks walk through the shards as one process
    with a W times larger batch would. All ranks move to the next shard at the same
    time (build-nanogpt's check depended on the rank and could desynchronise them).
    """

    def __init__(self, B, T, process_rank, num_processes, split, data_root="edu_fineweb10B"):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.shards = list_shards(data_root, split)
        need = B * T * num_processes + 1
        for path in self.shards:  # opening a memmap reads only the header: cheap, and fails early
            n = len(load_tokens(path))
            if n < need:
                raise UserError(f"shard {path} has {n:,} tokens but one batch needs B*T*processes+1 = {need:,}; "
                                "use a smaller -B/-T or larger shards")
        self.reset()

    def reset(self):
        self.current_shard = 0
        self.tokens = load_tokens(self.shards[self.current_shard])
        self.current_position = 0  # where this step's W chunks start, the same on every rank

    def next_batch(self):
        B, T = self.B, self.T
        start = self.current_position + B * T * self.process_rank
        buf = torch.from_numpy(self.tokens[start: start + B * T + 1].astype(np.int64))
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets: the same tokens shifted by one
        self.current_position += B * T * self.num_processes
        # move on when the next step's chunks (plus the one extra target token) would not fit
        if self.current_position + B * T * self.num_processes + 1 > len(self.tokens):
            self.current_shard = (self.current_shard + 1) % len(self.shards)
            self.tokens = load_tokens(self.shards[self.current_shard])
            self.current_position = 0
        return x, y


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def configure_optimizers(model, weight_decay, learning_rate, device_type):
    """AdamW with decay on matrices (matmul weights, embeddings) only; biases and LayerNorm gains are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay_params = [p for p in params if p.dim() >= 2]
    nodecay_params = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay_params, "weight_decay": weight_decay},
        {"params": nodecay_params, "weight_decay": 0.0},
    ]
    # the fused CUDA kernel updates all parameters in one launch instead of several per tensor
    use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    extra = {"fused": True} if use_fused else {}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, **extra)


def get_lr(step, args):
    """Linear warmup over warmup_steps, then cosine decay from max_lr to min_lr at max_steps."""
    max_lr = args.max_lr
    min_lr = args.max_lr * args.min_lr_ratio
    if step < args.warmup_steps:
        return max_lr * (step + 1) / args.warmup_steps
    if step > args.max_steps:
        return min_lr
    decay_ratio = (step - args.warmup_steps) / (args.max_steps - args.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)


# -----------------------------------------------------------------------------
# Evaluation: val loss, HellaSwag, samples


@torch.no_grad()
def estimate_val_loss(model, val_loader, val_steps, device, autocast_ctx):
    val_loader.reset()  # the same val tokens at every evaluation, so the numbers compare
    loss_accum = torch.zeros((), device=device)
    for _ in range(val_steps):
        x, y = val_loader.next_batch()
        x, y = x.to(device), y.to(device)
        with autocast_ctx:
            _, loss = model(x, y)
        loss_accum += loss.detach() / val_steps
    return loss_accum


def sample_text(model, enc, prompt, num_samples, max_length, device, seed):
    """build-nanogpt's samples: top-50 sampling from a fixed prompt, `max_length` tokens in all."""
    tokens = torch.tensor(enc.encode(prompt), dtype=torch.long, device=device)
    idx = tokens.unsqueeze(0).repeat(num_samples, 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    out = model.generate(idx, max_length - idx.size(1), top_k=50, generator=generator)
    # a barely trained model can pick one of the padding ids past the tokenizer's vocabulary
    return [enc.decode([t for t in row.tolist() if t < enc.n_vocab]) for row in out]


# -----------------------------------------------------------------------------
# Checkpoints


def atomic_torch_save(obj, path):
    """Write to a temporary name, fsync, then rename: a crash leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path, model, step, val_loss, args):
    atomic_torch_save({
        "model": model.state_dict(),  # the plain module: no "_orig_mod." or "module." prefixes
        "config": asdict(model.config),
        "step": step,
        "val_loss": val_loss,
        "args": vars(args),
    }, path)


def load_model_checkpoint(path, device="cpu"):
    """Rebuild a GPT from a checkpoint file written by save_checkpoint."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, KeyError, TypeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is not a readable train_gpt2.py checkpoint ({first_line(e)})") from None
    return model.to(device)


# -----------------------------------------------------------------------------
# Devices and throughput

# Dense bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s; matched against the device name.
GPU_PEAK_BF16_TFLOPS = [
    ("H200", 989.5), ("H100 PCIe", 756.0), ("H100", 989.5), ("GH200", 989.5), ("H800", 989.5),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0),
    ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("A6000", 154.8), ("V100", 125.0), ("T4", 65.0),
]


def cpu_peak_flops():
    """fp32 FMA peak of the CPU cores torch uses: threads x clock x (2 FMA units x SIMD lanes x 2)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    if not mhz:
        return None
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    return torch.get_num_threads() * max(mhz) * 1e6 * 2 * lanes * 2


def device_peak_flops(device_type, override_tflops=None):
    """Peak FLOP/s used as MFU's denominator, or None where unknown (MFU is then not printed)."""
    if override_tflops:
        return override_tflops * 1e12
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        return next((tf * 1e12 for key, tf in GPU_PEAK_BF16_TFLOPS if key in name), None)
    if device_type == "cpu":
        return cpu_peak_flops()
    return None


def autodetect_device():
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


# -----------------------------------------------------------------------------
# Flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train GPT-2 from scratch; the defaults are the GPT-2 124M recipe.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_dir", default="edu_fineweb10B", help="folder of *_train_*.npy / *_val_*.npy shards")
    g.add_argument("--log_dir", default="log", help="log.txt and model_*.pt go here")
    g.add_argument("--overwrite", action="store_true", help="start over in a --log_dir that already holds a run")
    g = p.add_argument_group("batch")
    g.add_argument("-B", "--batch_size", type=int, default=64, help="micro-batch size per process")
    g.add_argument("-T", "--seq_len", type=int, default=1024, help="sequence length")
    g.add_argument("--total_batch_size", type=int, default=524288, help="tokens per optimizer step (2**19)")
    g = p.add_argument_group("optimization")
    g.add_argument("--max_steps", type=int, default=19073, help="10B tokens / 2**19 tokens per step")
    g.add_argument("--warmup_steps", type=int, default=715, help="375M tokens, as in GPT-3")
    g.add_argument("--max_lr", type=float, default=6e-4)
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="min_lr = max_lr * this")
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval_every", type=int, default=250, help="val loss, HellaSwag and samples every N steps")
    g.add_argument("--val_steps", type=int, default=20, help="val batches per evaluation")
    g.add_argument("--hellaswag", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--hellaswag_limit", type=int, default=None, help="score only the first N val examples")
    g.add_argument("--sample", action=argparse.BooleanOptionalAction, default=True,
                   help="print 4 samples at every evaluation")
    g.add_argument("--checkpoint_every", type=int, default=5000, help="save log/model_{step}.pt every N steps")
    g = p.add_argument_group("model")
    g.add_argument("--n_layer", type=int, default=12)
    g.add_argument("--n_head", type=int, default=12)
    g.add_argument("--n_embd", type=int, default=768)
    g.add_argument("--block_size", type=int, default=1024)
    g.add_argument("--vocab_size", type=int, default=50304, help="50257 padded to a multiple of 128 for speed")
    g = p.add_argument_group("system")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default: bf16 on CUDA GPUs that support it, else fp32)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU, if not in the table")
    g.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)

    positive = ["batch_size", "seq_len", "total_batch_size", "max_steps", "warmup_steps", "eval_every",
                "val_steps", "checkpoint_every", "n_layer", "n_head", "n_embd", "block_size", "vocab_size"]
    for name in positive:
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.seq_len > args.block_size:
        p.error(f"-T/--seq_len {args.seq_len} is longer than --block_size {args.block_size}")
    if args.warmup_steps >= args.max_steps:
        p.error(f"--warmup_steps {args.warmup_steps} must be below --max_steps {args.max_steps}")
    if args.max_lr <= 0 or not 0 <= args.min_lr_ratio <= 1:
        p.error("--max_lr must be positive and --min_lr_ratio within [0, 1]")
    if args.hellaswag_limit is not None and args.hellaswag_limit <= 0:
        p.error("--hellaswag_limit must be positive")
    return args


def prepare_log_dir(log_dir, overwrite):
    """A new run never silently replaces an old one's log or checkpoints."""
    os.makedirs(log_dir, exist_ok=True)
    log_file = os.path.join(log_dir, "log.txt")
    previous = sorted(glob.glob(os.path.join(log_dir, "model_*.pt")))
    if os.path.exists(log_file):
        previous.insert(0, log_file)
    if previous and not overwrite:
        names = ", ".join(os.path.basename(f) for f in previous[:3]) + (" ..." if len(previous) > 3 else "")
        raise UserError(f"{log_dir} already holds a run ({names}); pass --log_dir NEW_DIR, "
                        "or --overwrite to delete it and start over")
    for f in previous:
        os.remove(f)
    open(log_file, "w").close()
    return log_file


# -----------------------------------------------------------------------------
# Training loop


def train(args):
    # --- processes and devices: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE
    ddp = int(os.environ.get("RANK", -1)) != -1
    ddp_rank = int(os.environ.get("RANK", 0))
    ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
    ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
    master_process = ddp_rank == 0  # only this process logs, evaluates samples and saves checkpoints

    device_type = (args.device or autodetect_device()).split(":")[0]
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"--device {args.device!r} is not one of cuda, mps, cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; drop --device or use --device cpu")
    if device_type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu")
    if ddp and device_type == "mps":
        raise UserError("torchrun with several processes is not supported on MPS; run `python train_gpt2.py`")
    device = f"cuda:{ddp_local_rank}" if device_type == "cuda" else device_type
    if device_type == "cuda":
        torch.cuda.set_device(device)

    dtype = args.dtype or ("bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    autocast_ctx = (torch.autocast(device_type=device_type, dtype=torch.bfloat16) if dtype == "bf16"
                    else contextlib.nullcontext())

    B, T = args.batch_size, args.seq_len
    tokens_per_micro_step = B * T * ddp_world_size
    if args.total_batch_size % tokens_per_micro_step != 0:
        raise UserError(f"--total_batch_size {args.total_batch_size} is not a multiple of B*T*processes = "
                        f"{B}*{T}*{ddp_world_size} = {tokens_per_micro_step}; change -B, -T or --total_batch_size")
    grad_accum_steps = args.total_batch_size // tokens_per_micro_step

    # check everything the user supplied before the (slow) process group and model start
    train_loader = DataLoaderLite(B, T, ddp_rank, ddp_world_size, "train", args.data_dir)
    val_loader = DataLoaderLite(B, T, ddp_rank, ddp_world_size, "val", args.data_dir)
    enc = None
    try:
        if args.sample or args.hellaswag:
            enc = hellaswag.get_encoder()
    except hellaswag.HellaSwagError as e:
        raise UserError(f"{e}; or pass --no-sample --no-hellaswag") from None
    try:
        if args.hellaswag:
            hellaswag.download("val")
    except hellaswag.HellaSwagError as e:
        raise UserError(f"{e}; or pass --no-hellaswag") from None
    log_file = prepare_log_dir(args.log_dir, args.overwrite) if master_process else None

    if ddp:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    torch.manual_seed(args.seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(args.seed)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls; CPU matmuls stay full fp32

    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    raw_model = GPT(config).to(device)  # the plain module: evaluated, sampled and saved
    model = torch.compile(raw_model) if use_compile else raw_model
    if ddp:
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)
    optimizer = configure_optimizers(raw_model, args.weight_decay, args.max_lr, device_type)

    flops_per_token = raw_model.flops_per_token(T)
    peak_flops = device_peak_flops(device_type, args.peak_tflops)
    if master_process:
        n_decay = sum(p.numel() for p in optimizer.param_groups[0]["params"])
        n_nodecay = sum(p.numel() for p in optimizer.param_groups[1]["params"])
        print(f"device {device} | dtype {dtype} | compile {use_compile} | processes {ddp_world_size}")
        print(f"model: {raw_model.num_params(non_embedding=False):,} parameters "
              f"({n_decay:,} decayed, {n_nodecay:,} not)")
        print(f"total batch {args.total_batch_size:,} tokens = {B} x {T} x {ddp_world_size} processes "
              f"x {grad_accum_steps} accumulation steps")
        print(f"train shards {len(train_loader.shards)}, val shards {len(val_loader.shards)} in {args.data_dir}")
        if peak_flops is None:
            print("MFU not shown: peak FLOP/s of this device unknown (pass --peak_tflops)")

    def log(line):
        with open(log_file, "a") as f:
            f.write(line + "\n")

    val_loss = None
    for step in range(args.max_steps):
        last_step = step == args.max_steps - 1

        # --- evaluate: at step 0, every eval_every steps and at the last step (before its update)
        if step % args.eval_every == 0 or last_step:
            model.eval()
            val_loss_t = estimate_val_loss(model, val_loader, args.val_steps, device, autocast_ctx)
            if ddp:
                dist.all_reduce(val_loss_t, op=dist.ReduceOp.AVG)
            val_loss = val_loss_t.item()
            if master_process:
                print(f"validation loss: {val_loss:.4f}")
                log(f"{step} val {val_loss:.4f}")
            if args.hellaswag:
                # the raw module: compiling would recompile for every example length
                result = hellaswag.evaluate(
                    lambda tokens: raw_model(tokens)[0], device, autocast_ctx=autocast_ctx,
                    rank=ddp_rank, world_size=ddp_world_size, limit=args.hellaswag_limit,
                    max_len=config.block_size)
                counts = torch.tensor([result.correct_norm, result.total], dtype=torch.long, device=device)
                if ddp:
                    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
                acc_norm = counts[0].item() / counts[1].item()
                if master_process:
                    print(f"HellaSwag accuracy: {counts[0].item()}/{counts[1].item()}={acc_norm:.4f}")
                    log(f"{step} hella {acc_norm:.4f}")
            if args.sample and master_process and step > 0:
                with autocast_ctx:
                    samples = sample_text(raw_model, enc, "Hello, I'm a language model,", 4, 32, device, seed=42)
                for i, text in enumerate(samples):
                    print(f"sample {i}: {text}")
            model.train()

        if master_process and step > 0 and (step % args.checkpoint_every == 0 or last_step):
            path = os.path.join(args.log_dir, f"model_{step:05d}.pt")
            save_checkpoint(path, raw_model, step, val_loss, args)
            print(f"saved {path}")

        # --- one optimizer step over grad_accum_steps micro-batches
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            x, y = train_loader.next_batch()
            x, y = x.to(device), y.to(device)
            # DDP all-reduces gradients only on the last micro-step; the others just accumulate locally
            sync = not ddp or micro_step == grad_accum_steps - 1
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with autocast_ctx:
                    _, loss = model(x, y)
                # mean over the whole batch, not over each micro-batch: scale before summing gradients
                loss = loss / grad_accum_steps
                loss_accum += loss.detach()
                loss.backward()
        if ddp:
            dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        lr = get_lr(step, args)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        optimizer.step()
        synchronize(device_type)
        dt = time.time() - t0
        if master_process:
            tokens_per_sec = args.total_batch_size / dt
            mfu = "" if peak_flops is None else \
                f" | mfu {100 * flops_per_token * tokens_per_sec / (peak_flops * ddp_world_size):.2f}%"
            print(f"step {step:5d} | loss {loss_accum.item():.6f} | lr {lr:.4e} | norm {norm.item():.4f} | "
                  f"dt {dt * 1000:.2f}ms | tok/sec {tokens_per_sec:.2f}{mfu}")
            log(f"{step} train {loss_accum.item():.6f}")

    if ddp:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except UserError as e:
        sys.exit(f"train_gpt2.py: error: {e}")


if __name__ == "__main__":
    main()
