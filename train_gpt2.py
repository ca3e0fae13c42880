"""
Train GPT-2 (124M) from scratch on FineWeb-Edu, the way OpenAI's paper describes it.

    python fineweb.py                                        # make the token shards first
    python train_gpt2.py                                     # one device
    torchrun --standalone --nproc_per_node=8 train_gpt2.py   # 8 GPUs on one node

The file reads top to bottom, in the lecture's order: the model, the data loader, the learning-rate
schedule, evaluation, then the training loop (the micro-steps and the optimizer step between its
TRAINING SECTION markers), its setup with DDP, and the flags. What only serves the recipe (checkpoints
and when to save, speed tooling, transformers conversion, shared helpers) is in the machinery/ package;
this file reads without it.
Nothing runs at import time; `main()` does the work.
"""

import argparse
import contextlib
import datetime
import glob
import inspect
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import core
import hellaswag
import variants
from machinery import checkpoints, common, hf_convert, preflight, runtime, sharding, speed
from machinery.common import UserError

# -----------------------------------------------------------------------------
# The model: GPT-2 exactly (pre-LayerNorm blocks, learned positions, tied embeddings)


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # 50,000 BPE merges + 256 byte tokens + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # beyond GPT-2 (variants.py): "llama" or "modern" blocks, rotary positions instead of learned ones
    arch: str = "gpt2"
    untie_head: bool = False  # lm_head its own matrix, starting at zero (the speedrun's)
    # the speedrun-simple recipe's knobs (variants.py); their defaults leave every other arch as it was
    bias: bool = False  # llama, modern, simple: biases in every linear and the head (gpt2's always have them)
    rotary: str = "full"  # "half": the speedrun's half-truncated rotary positions
    attn_scale: float = 0.0  # > 0: attention scores scaled by this instead of 1/sqrt(head size)
    embed_norm: bool = False  # an RMSNorm right after the embedding
    logit_softcap: float = 0.0  # > 0: logits squashed smoothly into (-cap, cap)
    # how to compute, not what: the same function either way, so checkpoints leave these two out
    attention: str = "sdpa"  # "sdpa": flash attention; "manual": the (T, T) matrix written out
    ce_chunk_rows: int = 0  # > 0: lm_head and the loss this many rows at a time, no whole-batch logits


def causal_attention(q, k, v, cache, attention, scale=None):
    """Each query position attends to itself and the positions before it: (B, nh, T, hs) in and out.
    `cache` (generation) keeps the keys and values of earlier tokens, so they are not computed again.
    `scale` multiplies the scores (None: 1/sqrt(hs), the paper's)."""
    T = q.size(2)
    if cache is not None:
        if "k" in cache:
            k = torch.cat((cache["k"], k), dim=2)  # (B, nh, T_cached + T, hs)
            v = torch.cat((cache["v"], v), dim=2)
        cache["k"], cache["v"] = k, v
    if attention == "sdpa" and k.size(2) == T:
        # flash attention: the (T, T) attention matrix is never written to memory
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # (B, nh, T, hs)
    # each query sees the cached keys and the causal part of the new ones
    mask = torch.ones(T, k.size(2), dtype=torch.bool, device=q.device).tril(k.size(2) - T)
    if attention == "manual":  # the textbook way, written out: the speed ladder's baseline
        att = (q @ k.transpose(-2, -1)) * (scale or 1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T_k)
        return F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v  # (B, nh, T, hs)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


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
        self.attention = config.attention

    def forward(self, x, cache=None):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        # nh is the number of heads, hs the head size, C = nh * hs; the heads move into the batch dimension
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = causal_attention(q, k, v, cache, self.attention)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # the heads' outputs side by side again
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

    def forward(self, x, cache=None):
        # pre-norm: the residual stream itself is never normalised, only what branches off it
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        if config.arch == "gpt2":
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            ))
        else:  # llama, modern or simple (variants.py): rotary positions inside attention, so no wpe
            wte = nn.Embedding(config.vocab_size, config.n_embd)
            h, ln_f = variants.make_blocks(config, causal_attention)
            self.transformer = nn.ModuleDict(dict(wte=wte, h=h, ln_f=ln_f))
            if config.embed_norm:
                self.transformer["ln_e"] = variants.RMSNorm(config.n_embd, True, variants.norm_eps(config))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)
        if config.untie_head:
            self.lm_head.ZERO_INIT = True  # every token starts equally likely
        else:
            # weight tying: the input embedding and the output projection are one matrix
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if self.config.arch == "simple":  # the speedrun's reference init (variants.py)
            return variants.init_simple(module)
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                # each block adds twice into the residual stream; keep its variance from growing with depth
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "ZERO_INIT", False):  # the speedrun's output projections (variants.py)
                torch.nn.init.zeros_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, caches=None):
        """The final (B, T, n_embd) states, before lm_head; `caches` (one dict per layer) for generation."""
        B, T = idx.size()
        start = caches[0]["k"].size(2) if caches and "k" in caches[0] else 0  # tokens already in the cache
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if "wpe" in self.transformer:  # learned positions (GPT-2); the variants rotate q and k instead
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T)
            x = x + self.transformer.wpe(pos)  # (B, T, n_embd) + (T, n_embd)
        if "ln_e" in self.transformer:  # speedrun-simple: the embedding normalised
            x = self.transformer.ln_e(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches else None)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """(logits, loss); with ce_chunk_rows and targets, (None, loss): the logits are never made whole."""
        x = self.hidden_states(idx)
        if targets is not None and self.config.ce_chunk_rows:
            return None, speed.chunked_cross_entropy(x, self.lm_head.weight, targets, self.config.ce_chunk_rows)
        logits = self.logits(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def logits(self, x):
        """lm_head; with logit_softcap (speedrun-simple) squashed into (-cap, cap), in fp32, by cap * x / sqrt(x^2 +
        cap^2): no logit runs away, yet small ones pass almost unchanged."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap:
            logits = logits.float()
            logits = cap * logits * torch.rsqrt(logits.square() + cap ** 2)
        return logits

    @classmethod
    def from_pretrained(cls, name_or_path):
        """
        A GPT with trained weights, on the CPU: OpenAI's GPT-2 ("gpt2", "gpt2-medium", "gpt2-large",
        "gpt2-xl"), a transformers GPT-2 folder, or a checkpoint of this script ("log/model_19072.pt", or
        --fsdp's sharded "log/ckpt_01000").
        """
        if checkpoints.is_checkpoint(name_or_path) or os.path.isfile(name_or_path):
            ckpt = checkpoints.load_checkpoint(name_or_path)
            config, state_dict = ckpt["config"], ckpt["model"]
        else:  # transformers' weights, converted to this model's names and layout
            config, state_dict = hf_convert.from_transformers(name_or_path)
        try:
            model = cls(GPTConfig(**config))
            model.load_state_dict(state_dict)
        except (RuntimeError, TypeError) as e:  # the last line of load_state_dict's message names the problem
            detail = str(e).strip().splitlines()[-1].strip()
            raise UserError(f"{name_or_path}: the weights do not fit its config ({detail})") from None
        return model

    def configure_optimizers(self, weight_decay, learning_rate, device_type, fused=None, betas=(0.9, 0.95), eps=1e-8):
        """AdamW with decay on matrices (matmul weights, embeddings) only; biases and LayerNorm gains are left alone."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay_params = [p for p in params if p.dim() >= 2]
        nodecay_params = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        # the fused kernel updates all parameters in one launch instead of several per tensor (default: on CUDA)
        use_fused = (device_type == "cuda" if fused is None else fused) and \
            "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = {"fused": True} if use_fused else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **extra)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """Sample `max_new_tokens` tokens after each row of `idx` (B, T); returns (B, T + max_new_tokens)."""
        for idx in self.generate_steps(idx, max_new_tokens, temperature, top_k, generator, use_cache):
            pass
        return idx

    @torch.no_grad()
    def generate_steps(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """
        generate(), one token at a time: yields (B, T + n) after the n-th new token (for streaming).
        With the KV cache the prompt is run once and then one token per step; past block_size
        (where the window must slide) every step runs the whole, cropped sequence instead.
        """
        use_cache = use_cache and idx.size(1) + max_new_tokens <= self.config.block_size
        caches = [{} for _ in self.transformer.h] if use_cache else None
        new = idx
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self.logits(self.hidden_states(new, caches)[:, -1, :])  # (B, vocab_size)
            else:
                logits = self(idx[:, -self.config.block_size:])[0][:, -1, :]
            probs = F.softmax(logits.float() / temperature, dim=-1)
            if top_k is not None:
                # sample among the k most likely tokens only, renormalised by multinomial
                probs, candidates = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)
                new = torch.gather(candidates, -1, torch.multinomial(probs, 1, generator=generator))
            else:
                new = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, new), dim=1)
            yield idx

    def num_params(self, non_embedding=True):
        """Parameter count; the tied wte/lm_head matrix is counted once, wpe left out by default."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * H * Q * T, where N
        counts the weights that multiply: an embedding table is a lookup, so wpe and an untied wte are left
        out (a tied wte is lm_head's matrix, counted once)."""
        cfg = self.config
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        N = self.num_params()
        if self.transformer.wte.weight is not self.lm_head.weight:
            N -= self.transformer.wte.weight.numel()
        return 6 * N + 12 * L * H * Q * T


# -----------------------------------------------------------------------------
# Data: token shards written by fineweb.py: build-nanogpt's uint16 .npy, or llm.c's .bin

EOT = 50256  # <|endoftext|>: fineweb.py puts one before every document


def list_shards(data_root, split):
    """The shard files of one split, sorted by name, as build-nanogpt's loader orders them."""
    fix = ("download FineWeb-Edu's GPT-2 tokens with `python fineweb.py --pretokenized fineweb-edu-10B` (minutes) "
           "and pass --data_dir fineweb-edu-10B, or tokenize it here with `python fineweb.py` (about an hour), or for "
           "a first try `python fineweb.py --dataset shakespeare` and `python train_gpt2.py --first_try`, or point "
           "--data_dir at your shards")
    if not os.path.isdir(data_root):
        raise UserError(f"data directory {data_root!r} does not exist; {fix}")
    shards = sorted(glob.glob(os.path.join(data_root, f"*_{split}_*.npy")) +
                    glob.glob(os.path.join(data_root, f"*_{split}_*.bin")))
    if not shards:
        raise UserError(f"no {split} shards (*_{split}_*.npy or .bin) in {data_root!r}; {fix}")
    return shards


def load_tokens(path):
    """Memory-map one shard: only the slices a batch touches are read from disk."""
    fix = "delete it and rerun `python fineweb.py`"
    if path.endswith(".bin"):  # llm.c: 256 int32 (magic, version, token count, ...), then uint16 tokens
        if problem := common.bin_shard_problem(path):  # the magic number, the version, the size the header promises
            raise UserError(f"shard {path} {problem}; {fix}")
        num_tokens = int(np.fromfile(path, dtype=np.int32, count=3)[2])
        tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=256 * 4, shape=(num_tokens,))
    else:
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"shard {path} is unreadable ({e}); {fix}") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise UserError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, expected a 1-D uint16 "
                            "array as fineweb.py writes")
    return tokens


def check_token_ids(tokens, path, vocab_size):
    """Every id in `tokens` (a batch's slice of the shard at path: checked as it is read, so a shard is never
    scanned whole) is within the model's vocabulary; returns tokens."""
    if vocab_size is not None and len(tokens) and (top := int(tokens.max())) >= vocab_size:
        raise UserError(f"shard {path} holds token id {top}, beyond the model's vocabulary of {vocab_size}: "
                        "not GPT-2 tokens? delete it and rerun `python fineweb.py`")
    return tokens


def shuffle_documents(tokens, rng):
    """The shard's documents (each starting at <|endoftext|>; the first may be a continuation) in random order."""
    starts = np.flatnonzero(tokens == EOT)
    docs = np.split(np.asarray(tokens), starts[starts > 0])
    return np.concatenate([docs[i] for i in rng.permutation(len(docs))])


class DataLoaderLite:
    """
    Hands out (B, T) batches of consecutive tokens. Rank r of W reads the r-th of W
    adjacent B*T chunks, so together the ranks walk through the shards as one process
    with a W times larger batch would. All ranks move to the next shard at the same
    time (build-nanogpt's check depended on the rank and could desynchronise them).

    With shuffle, each epoch visits the shards in a seeded random order and each shard's
    documents in a seeded random order, the same on every rank; (epoch, place in the
    order, position) is the whole state, so a resumed run sees the same stream.
    """

    def __init__(self, B, T, process_rank, num_processes, split, data_root="edu_fineweb10B", vocab_size=None,
                 shuffle=False, seed=0):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.vocab_size, self.shuffle, self.seed = vocab_size, shuffle, seed
        self._loaded = None  # which shard (and, shuffling, which epoch's order of it) self.tokens holds
        need = B * T * num_processes + 1
        self.shards, self.skipped = [], []
        for path in list_shards(data_root, split):  # opening a memmap reads only the header: cheap, fails early
            # a shard too short for one step (often the last, partial one) could never be read: leave it out
            (self.shards if len(load_tokens(path)) >= need else self.skipped).append(path)
        if not self.shards:
            raise UserError(f"every {split} shard in {data_root!r} is shorter than one batch, B*T*processes+1 = "
                            f"{need:,} tokens; use a smaller -B/-T or larger shards")
        self.reset()
        check_token_ids(self.tokens[:need], self.shards[self.current_shard], vocab_size)  # GPT-2's? before a step

    def reset(self):
        self.epoch, self.order_index = 0, 0
        self._load_shard()
        self.current_position = 0  # where this step's W chunks start, the same on every rank

    def _load_shard(self):
        """Load the shard at order_index of this epoch's order (name order unless shuffling)."""
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards)) if self.shuffle
                 else range(len(self.shards)))
        self.current_shard = int(order[self.order_index])
        # the val loader resets at every evaluation: keep the shard in hand rather than read and check it again
        key = (self.current_shard, self.epoch if self.shuffle else None)
        if self._loaded == key:
            return
        self._loaded = key
        self.tokens = load_tokens(self.shards[self.current_shard])
        if self.shuffle:
            self.tokens = shuffle_documents(self.tokens, np.random.default_rng([self.seed, self.epoch,
                                                                                self.current_shard]))

    def next_batch(self):
        B, T = self.B, self.T
        start = self.current_position + B * T * self.process_rank
        chunk = check_token_ids(self.tokens[start: start + B * T + 1], self.shards[self.current_shard], self.vocab_size)
        buf = torch.from_numpy(chunk.astype(np.int64))
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets: the same tokens shifted by one
        self.current_position += B * T * self.num_processes
        self._advance_if_needed()
        return x, y

    def _advance_if_needed(self):
        # move on when the next step's chunks (plus the one extra target token) would not fit
        if self.current_position + self.B * self.T * self.num_processes + 1 > len(self.tokens):
            self.order_index += 1
            if self.order_index == len(self.shards):
                self.epoch, self.order_index = self.epoch + 1, 0
            self._load_shard()
            self.current_position = 0

    def state_dict(self):
        """The position, shared by all ranks: rank r reads next at position + r * B * T."""
        return {"epoch": self.epoch, "order_index": self.order_index, "shard": self.current_shard,
                "position": self.current_position, "shard_name": os.path.basename(self.shards[self.current_shard]),
                "shuffle": self.shuffle, "seed": self.seed}

    def load_state_dict(self, state):
        names = [os.path.basename(p) for p in self.shards]
        if state["shard"] >= len(names) or names[state["shard"]] != state["shard_name"]:
            raise UserError(f"the checkpoint was reading shard {state['shard_name']} (number {state['shard']}), "
                            f"which is not where it was in the {len(names)} shards of the data dir now; "
                            "resume with the same --data_dir contents")
        self.epoch, self.order_index = state["epoch"], state["order_index"]
        self._load_shard()
        self.current_position = state["position"]
        # another -B or world size reads a differently sized group of chunks: it may not fit here any more
        self._advance_if_needed()


# -----------------------------------------------------------------------------
# Learning-rate schedule: linear warmup, then cosine decay (GPT-3 Small's)


def get_lr(step, args):
    """Linear warmup over warmup_steps, then cosine decay from max_lr to min_lr at max_steps.
    (--schedule wsd: warmup, stable, then a linear cooldown; see variants.py.)"""
    if args.schedule == "wsd":
        return variants.wsd_lr(step, args)
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
def estimate_val_loss(model, val_batches, val_steps, device, autocast_ctx):
    """Mean loss over val_steps batches of a DevicePrefetcher, from the start of the val split."""
    val_batches.reset()  # the same val tokens at every evaluation, so the numbers compare
    loss_accum = torch.zeros((), device=device)
    for _ in range(val_steps):
        x, y = val_batches.next_batch()
        with autocast_ctx:
            _, loss = model(x, y)
        loss_accum += loss.detach() / val_steps
    return loss_accum


def first_val_tokens(val_loader, n, vocab_size):
    """--val_tokens: the val split's first n + 1 tokens (n predicted), across its shards if need be."""
    parts, have = [], 0
    for path in val_loader.shards:
        part = check_token_ids(load_tokens(path)[:n + 1 - have], path, vocab_size)
        parts.append(torch.from_numpy(part.astype(np.int64)))
        have += len(parts[-1])
        if have == n + 1:
            return torch.cat(parts)
    raise UserError(f"--val_tokens {n:,} needs {n + 1:,} val tokens and the val shards hold {have:,}; pass a "
                    "smaller --val_tokens")


@torch.no_grad()
def val_loss_over_tokens(model, tokens, B, T, compute):
    """The mean loss over every token of `tokens` but the first, as the speedrun measures it: its T-token rows
    shared out among the ranks, B at a time, each loss weighted by its tokens, summed over all ranks."""
    n = len(tokens) - 1
    rows = n // T
    mine = range(compute.rank * rows // compute.world_size, (compute.rank + 1) * rows // compute.world_size)
    loss_sum = torch.zeros((), device=compute.device, dtype=torch.float64)
    for start in range(mine.start, mine.stop, B):
        end = min(start + B, mine.stop)
        x = tokens[start * T:end * T].view(-1, T).to(compute.device)
        y = tokens[start * T + 1:end * T + 1].view(-1, T).to(compute.device)
        with compute.autocast_ctx:
            _, loss = model(x, y)
        loss_sum += loss.detach().double() * y.numel()
    if compute.ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    return loss_sum / n


def sample_text(model, enc, prompt, num_samples, max_new_tokens, device, seed, temperature=1.0, top_k=50):
    """`num_samples` continuations of `prompt`, decoded; the same seed gives the same texts."""
    for texts in sample_stream(model, enc, prompt, num_samples, max_new_tokens, device, seed, temperature, top_k,
                               every=max_new_tokens):
        pass
    return texts


def sample_stream(model, enc, prompt, num_samples, max_new_tokens, device, seed, temperature=1.0, top_k=50, every=1):
    """sample_text, streamed: yields the texts so far after every `every` new tokens, and at the end."""
    tokens = torch.tensor(enc.encode(prompt), dtype=torch.long, device=device)
    idx = tokens.unsqueeze(0).repeat(num_samples, 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    steps = model.generate_steps(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    for n, idx in enumerate(steps, start=1):
        if n % every == 0 or n == max_new_tokens:
            # a barely trained model can pick one of the padding ids past the tokenizer's vocabulary
            yield [enc.decode([t for t in row.tolist() if t < enc.n_vocab]) for row in idx]


# -----------------------------------------------------------------------------
# Training: the loop first, then the phases it calls, in the order it calls them


def train(args):
    """The run; returns the exit code."""
    compute = compute_init(args)
    inputs = check_inputs(args, compute)
    with checkpoints.claim_log_dir(args, holder=compute.master and not args.benchmark) as was_ours:
        run = setup_run(args, compute, inputs, was_ours)
        if run is None:  # nothing left to do
            return 0
        # from here on SIGTERM (preemption, torchrun shutting down) or Ctrl-C finish the step, save and exit
        with checkpoints.stop_signals_caught() as stop_signals:
            try:
                return train_loop(run, stop_signals)
            except KeyboardInterrupt:  # a second Ctrl-C: at once, wherever the run was (a save is dropped whole)
                print("train_gpt2.py: stopped at once by a second Ctrl-C; a checkpoint being written was dropped, "
                      "the earlier ones are intact: run the same command again to resume", file=sys.stderr,
                      flush=True)
                return 128 + signal.SIGINT


def train_loop(run, stop_signals):
    """The loop; returns the exit code. A signal appended to stop_signals ends it at the next step, saved."""
    args = run.args
    run.started = time.time()
    if args.benchmark:  # its peak memory is the steps'
        speed.reset_peak_memory(run.compute.device_type)
    stop = timed = False  # a stop signal, a timed save: asked for during the step before, agreed by all ranks
    for step in range(run.start_step, args.max_steps):
        last_step = step == args.max_steps - 1

        # --- evaluate: at step 0, every eval_every steps and at the last step (before its update)
        if not stop and not args.benchmark and (step % args.eval_every == 0 or last_step):
            evaluate(run, step)
        if not stop and args.core_every and step > 0 and (step % args.core_every == 0 or last_step):
            evaluate_core(run, step)  # opt-in: nanochat's CORE (core.py)
        # --- the checkpointer writes what is due at this step; after a stop signal, that is where the run ends
        saved = run.checkpointer.save(step, run.val_loss, last_step=last_step, stop=stop, timed=timed)
        if stop:
            return stop_run(run, step, saved, stop_signals)

        # --- one optimizer step (train_step holds the TRAINING SECTION)
        loss, lr, norm, dt, stop, timed = train_step(run, step, stop_signals)
        norm = norm.item()  # computed already: a read, not a wait
        check_finite(run, step, loss, norm)
        report_step(run, step, loss, lr, norm, dt)
    return finish_run(run)


def train_step(run, step, stop_signals):
    """One optimizer step: the whole batch's gradient over grad_accum_steps micro-batches, clipped, then the
    update at this step's learning rate. Returns (loss, lr, norm, dt, stop, timed): the mean loss over all
    ranks, and whether any rank asked to stop or a timed save is due (see share_step_results)."""
    args, compute, model, optimizer = run.args, run.compute, run.model, run.optimizer
    # --------------- TRAINING SECTION BEGIN ---------------
    t0 = time.time()
    # the gradient of the whole batch, summed over grad_accum_steps micro-batches
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=compute.device)
    for micro_step in range(run.grad_accum_steps):
        x, y = run.train_batches.next_batch()
        # DDP all-reduces gradients only on the last micro-step; the others just accumulate locally
        sync = not compute.ddp or micro_step == run.grad_accum_steps - 1
        if args.fsdp:  # FSDP the same way: the gradients are reduce-scattered to their shards at the last one
            model.set_requires_gradient_sync(sync)
        with contextlib.nullcontext() if sync or args.fsdp else model.no_sync():
            with compute.autocast_ctx:
                _, loss = model(x, y)
            # mean over the whole batch, not over each micro-batch: scale before summing gradients
            loss = loss / run.grad_accum_steps
            loss_accum += loss.detach()
            loss.backward()
    # the global gradient norm, clipped to --grad_clip (0: measured only, as the speedrun-simple recipe has it)
    norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), args.grad_clip or math.inf)
    lr = get_lr(step, args)
    for param_group in optimizer.param_groups:
        # one learning rate for every group (GPT-2's AdamW); with Muon each group has its share of it
        param_group["lr"] = lr * param_group.get("lr_scale", 1.0)
        if "momentum" in param_group:  # Muon's momentum warmup
            param_group["momentum"] = variants.muon_momentum(step, args.muon_momentum_warmup)
    optimizer.step()
    # stop and save requests made during the step travel with its loss: the step's one host sync
    stop = len(stop_signals) > 0
    timed = run.checkpointer.timed_save_due()
    loss, stop, timed = share_step_results(compute, loss_accum, stop, timed)
    runtime.synchronize(compute.device_type)
    dt = time.time() - t0
    # --------------- TRAINING SECTION END -----------------
    return loss, lr, norm, dt, stop, timed


def evaluate(run, step):
    """Val loss, HellaSwag accuracy and (after step 0) samples; rank 0 prints and logs them."""
    args = run.args
    with evaluation_mode(run):
        evaluate_val_loss(run, step)
        if args.hellaswag:
            evaluate_hellaswag(run, step)
        # rank 0 prints them; under --fsdp every rank samples too, or FSDP's state on rank 0 alone would see the
        # extra forward passes, and the ranks' next collectives would differ (a hang)
        if args.sample and step > 0 and (run.compute.master or args.fsdp):
            print_samples(run)


@contextlib.contextmanager
def evaluation_mode(run):
    """The model in eval mode for what the block does, and in train mode again after."""
    run.model.eval()
    # --fsdp compiles its blocks in place: evaluation's other shapes would recompile them, and make the training
    # graph dynamic-shape for the rest of the run, so there they run eager (elsewhere the model trains compiled
    # and evaluates through its own graphs)
    eager = torch.compiler.set_stance("force_eager") if run.args.fsdp else contextlib.nullcontext()
    with sharding.gathered(run.raw_model), eager:  # --fsdp: every rank holds the whole model (else nothing)
        yield
    run.model.train()


def evaluate_val_loss(run, step):
    args, compute = run.args, run.compute
    if args.val_tokens:  # exactly the first --val_tokens tokens, whatever -B and the number of ranks
        val_loss = val_loss_over_tokens(run.model, run.val_tokens, args.batch_size, args.seq_len, compute)
    else:
        val_loss = estimate_val_loss(run.model, run.val_batches, args.val_steps, compute.device, compute.autocast_ctx)
        if compute.ddp:
            dist.all_reduce(val_loss, op=dist.ReduceOp.AVG)
    run.val_loss = val_loss.item()
    run.metrics(step, **{"val/loss": run.val_loss})
    compute.print0(f"validation loss: {run.val_loss:.4f}")
    run.log(f"{step} val {run.val_loss:.4f}")
    if run.val_bytes_per_token is None:  # once: the same val tokens at every evaluation
        run.val_bytes_per_token = 0.0 if args.synthetic else \
            val_bytes_per_token(run.val_batches, args.val_steps, run.val_tokens, compute, args.vocab_size)
    if run.val_bytes_per_token:  # beside the loss, not in log.txt: the log keeps build-nanogpt's format
        bpb = run.val_loss / (math.log(2) * run.val_bytes_per_token)
        run.metrics(step, **{"val/bpb": bpb})
        compute.print0(f"validation bits per byte: {bpb:.4f}")


def evaluate_hellaswag(run, step):
    """Each rank scores its share of the examples; the counts are summed."""
    args, compute = run.args, run.compute
    result = hellaswag.evaluate(run.hella_model, compute.device, rank=compute.rank, world_size=compute.world_size,
                                limit=args.hellaswag_limit, batch_tokens=args.hellaswag_batch_tokens,
                                autocast_ctx=compute.autocast_ctx)
    counts = torch.tensor([result.correct_norm, result.total], dtype=torch.long, device=compute.device)
    if compute.ddp:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    correct, total = counts.tolist()
    run.hella = correct / total
    run.metrics(step, **{"hellaswag/acc_norm": run.hella})
    compute.print0(f"HellaSwag accuracy: {correct}/{total}={correct / total:.4f}")
    run.log(f"{step} hella {correct / total:.4f}")


def evaluate_core(run, step):
    """--core_every: CORE on --core_max_per_task items of each task (nanochat's way while training), each rank
    scoring its share; the counts are summed."""
    args, compute = run.args, run.compute
    with evaluation_mode(run):
        scores = core.evaluate(run.hella_model, compute.device, *run.core_bundle, args.core_max_per_task,
                               compute.rank, compute.world_size, autocast_ctx=compute.autocast_ctx)
        scores = core.sum_scores(scores, compute.device, compute.ddp)
    run.core = core.core_score(scores)
    run.metrics(step, **{"core/metric": run.core})
    compute.print0(f"CORE: {run.core:.4f} ({len(scores)} tasks, up to {args.core_max_per_task} examples each)")
    run.log(f"{step} core {run.core:.4f}")


def val_bytes_per_token(val_batches, val_steps, val_tokens, compute, vocab_size):
    """The mean UTF-8 bytes of the val tokens the loss is taken over (<|endoftext|> counts none: it is no text),
    for bits per byte; 0 when the tokenizer cannot be loaded. Reads the val batches as estimate_val_loss just did:
    they end where they were."""
    try:
        enc = common.get_encoder()
    except UserError:
        return 0.0
    nbytes = torch.zeros(max(vocab_size, EOT + 1), dtype=torch.float64)
    nbytes[:EOT] = torch.tensor([len(enc.decode_single_token_bytes(i)) for i in range(EOT)], dtype=torch.float64)
    if val_tokens is not None:  # --val_tokens: every rank knows them all
        return (nbytes[val_tokens[1:]].mean()).item()
    val_batches.reset()
    total = torch.zeros(2, dtype=torch.float64, device=compute.device)
    for _ in range(val_steps):
        y = val_batches.next_batch()[1].cpu()
        total += torch.tensor([nbytes[y].sum().item(), y.numel()], dtype=torch.float64, device=compute.device)
    if compute.ddp:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


def print_samples(run):
    prompt = "Hello, I'm a language model,"  # build-nanogpt's: 8 tokens, 32 in all
    with run.compute.autocast_ctx:
        samples = sample_text(run.raw_model, run.enc, prompt, 4, 32 - len(run.enc.encode(prompt)),
                              run.compute.device, seed=42)
    for i, text in enumerate(samples):
        one_line = text.replace("\n", "\\n")  # one line per sample, its newlines shown as \n
        run.compute.print0(f"sample {i}: {one_line}")


def stop_run(run, step, saved, stop_signals):
    """After a stop signal: every rank waits for the checkpoint to be complete, then exits. Returns the exit
    code, 128 + the signal's number: non-zero, so a restart loop runs the command again."""
    compute = run.compute
    if compute.ddp:
        dist.barrier()
    signum = stop_signals[0] if stop_signals else signal.SIGTERM
    # the line and its newline in one write: every rank prints this at the same moment, often to one file
    print(f"rank {compute.rank}: stopped at step {step} on {signal.Signals(signum).name}"
          + (f", saved {saved}" if saved else "") + "; run the same command again to resume\n", end="", flush=True)
    if run.wandb is not None:  # ended here, not by wandb's own exit hook: an FSDP rank skips the interpreter's exit
        run.wandb.finish(exit_code=128 + signum)
    if compute.ddp:
        end_process_group(run)
    return 128 + signum


def end_process_group(run):
    """The process group's end, once every rank is past its last collective. DDP's reducer holds the group, so it
    goes first: the group then ends in destroy_process_group, where torch lets go of the GIL while it waits for
    gloo's worker threads. Ended from the reducer's deallocation instead, with the GIL held, it deadlocked against
    a worker thread freeing the barrier's tensors, which needs the GIL (torch's issue 56297): seen as a rank of a
    finished run that never exited."""
    run.model = run.raw_model
    runtime.end_process_group(run.args.fsdp)


def share_step_results(compute, loss_accum, stop, timed):
    """
    The step's mean loss over all ranks, and whether any rank asked to stop or (rank 0) to save: under DDP
    one all-reduce carries all three, so every rank acts on them at the top of the next step. This is the
    step's one host sync. Returns (loss, stop, timed).
    """
    if not compute.ddp:
        return loss_accum.item(), stop, timed
    shared = torch.zeros(3, device=compute.device)  # filled on the device: no host-to-device copy to wait on
    shared[0] = loss_accum / compute.world_size
    if stop:
        shared[1] = 1.0
    if timed:
        shared[2] = 1.0
    dist.all_reduce(shared, op=dist.ReduceOp.SUM)
    return shared.tolist()


def check_finite(run, step, loss, norm):
    """Stop a diverged run here, on every rank alike (the loss is all-reduced, the norm the same everywhere),
    before a non-finite state can be evaluated, saved, or rotate a healthy checkpoint out."""
    if not (math.isfinite(loss) and math.isfinite(norm)):
        message = (f"the run diverged at step {step} (loss {loss}, gradient norm {norm}); nothing from that step on "
                   f"was saved: lower --max_lr (now {run.args.max_lr}) or lengthen --warmup_steps, then rerun to "
                   "resume from the last checkpoint")
        if run.log_file:  # rank 0: a restart of the same command refuses at once (exit 3)
            checkpoints.mark_diverged(run.args.log_dir, message)
        raise common.RunDiverged(message)


def report_step(run, step, loss, lr, norm, dt):
    """The step line on rank 0 (its `dt ...ms` field is what benchmark scripts parse), and log.txt's line."""
    run.step_times.append(dt)
    if not run.compute.master:
        return
    tokens_per_sec = run.args.total_batch_size / dt
    mfu = None if run.peak_flops is None else \
        speed.mfu_percent(run.flops_per_token, tokens_per_sec, run.peak_flops, run.compute.world_size)
    now = time.time()
    if step == run.start_step:  # compiling and warming up: no estimate from this step
        run.eta_from, eta = now, "-"
    else:  # the steps since, evaluations included
        eta = duration((now - run.eta_from) / (step - run.start_step) * (run.args.max_steps - step - 1))
    print(f"step {step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm {norm:.4f} | "
          f"dt {dt * 1000:.2f}ms | tok/sec {tokens_per_sec:.2f}" + ("" if mfu is None else f" | mfu {mfu:.2f}%") +
          f" | elapsed {duration(now - run.started)} | eta {eta}")
    run.log(f"{step} train {loss:.6f}")
    run.metrics(step, **{"train/loss": loss, "lr": lr, "norm": norm, "tok_per_sec": tokens_per_sec},
                **({} if mfu is None else {"mfu": mfu}))


def duration(seconds):
    """12s, 3m05s, 2h07m: the step line's elapsed time and ETA."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def finish_run(run):
    """After the last step: the summary (or --benchmark's line) on rank 0, then the ranks tear down together."""
    args, compute = run.args, run.compute
    if compute.master and args.benchmark:
        speed.print_benchmark(args, run.step_times, run.flops_per_token, run.peak_flops, compute.world_size,
                              compute.device_type, speed.model_state_bytes(run.raw_model, run.optimizer))
    elif compute.master:
        print_summary(run)
        if run.wandb is not None:
            run.wandb.finish()
    if compute.ddp:
        dist.barrier()  # no rank closes its connections while another still uses them
        end_process_group(run)
    return 0


def print_summary(run):
    """What the run did, on rank 0 once the last step is done: the whole run's steps, the share of them this
    process ran, and the final model. The last step evaluates and saves before its own update (as in
    build-nanogpt), so model_{max_steps - 1}.pt holds the weights after max_steps - 1 updates, as it records."""
    args = run.args
    last = args.max_steps - 1
    final = os.path.join(args.log_dir, f"model_{last:05d}.pt")
    hella = ("" if run.hella is None else f" | HellaSwag {run.hella:.4f}") + \
        ("" if run.core is None else f" | CORE {run.core:.4f}")
    print(f"done: {args.max_steps} steps ({args.max_steps * args.total_batch_size:,} tokens), "
          f"{args.max_steps - run.start_step} of them in this process, in {duration(time.time() - run.started)} | "
          f"model {final}: after {last} updates ({last * args.total_batch_size:,} tokens) | "
          f"val loss {run.val_loss:.4f}{hella}")


# -----------------------------------------------------------------------------
# Setup: what train() does before the loop


@dataclass
class Compute:
    """This process under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE), its device and precision."""
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str  # "cuda:{local_rank}", "mps" or "cpu"
    device_type: str  # "cuda", "mps" or "cpu"
    dtype: str  # "bf16" (autocast) or "fp32"
    autocast_ctx: object
    use_compile: bool
    keeps_freed_memory: bool = False  # on CPU: see speed.keep_freed_cpu_memory

    @property
    def master(self):
        """Only this process logs, prints samples and saves checkpoints."""
        return self.rank == 0

    def print0(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def compute_init(args):
    """Which process this is, the device it trains on (each rank its own GPU), and in which precision."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device_type = runtime.check_device_type(args.device)
    if ddp and device_type == "mps":
        raise UserError("torchrun with several processes is not supported on MPS; run `python train_gpt2.py`")
    if args.fsdp and not ddp:
        raise UserError("--fsdp shards the model across torchrun's processes; run it under torchrun, e.g. torchrun "
                        "--standalone --nproc_per_node=8 train_gpt2.py --fsdp (1 for a single device)")
    if ddp:
        runtime.check_restartable()
        common.exit_with_parent(f"rank {rank}")  # a kill -9 of torchrun must not leave this rank training
    device = runtime.process_device(args.device, device_type, local_rank, ddp)
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dtype = args.dtype or ("bf16" if runtime.bf16_supported(device_type) else "fp32")
    autocast_ctx = (torch.autocast(device_type=device_type, dtype=torch.bfloat16) if dtype == "bf16"
                    else contextlib.nullcontext())
    use_compile = args.compile if args.compile is not None else device_type == "cuda"
    speed.select_sdpa_backend(args.sdpa_backend, device_type)
    kept = device_type == "cpu" and args.keep_freed_memory and speed.keep_freed_cpu_memory()
    return Compute(ddp, rank, local_rank, world_size, device, device_type, dtype, autocast_ctx, use_compile, kept)


@dataclass
class Run:
    """What the training loop works with; setup_run() makes it."""
    args: argparse.Namespace
    compute: Compute
    raw_model: GPT  # the plain module: evaluated, sampled and saved
    model: nn.Module  # the one that trains: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    train_batches: speed.DevicePrefetcher
    val_batches: speed.DevicePrefetcher
    hella_model: hellaswag.Model
    enc: object  # GPT-2's tokenizer, for the samples
    val_tokens: torch.Tensor  # --val_tokens's, or None
    grad_accum_steps: int
    start_step: int
    checkpointer: checkpoints.Checkpointer  # decides when to save, and saves
    log_file: str = None  # log.txt, on rank 0 (None elsewhere and with --benchmark)
    val_loss: float = None  # the latest, recorded in checkpoints
    started: float = 0.0  # time.time() when this process's loop began
    eta_from: float = 0.0  # when this process's first step ended: the ETA leaves out compiling and warming up
    hella: float = None  # the latest HellaSwag accuracy, for the summary
    core_bundle: tuple = None  # --core_every: (the bundle's path, whether it is nanochat's own, checked)
    core: float = None  # the latest CORE score, for the summary
    val_bytes_per_token: float = None  # for bits per byte (None: not measured, e.g. on --synthetic tokens)
    step_times: list = field(default_factory=list)
    flops_per_token: float = 0.0
    peak_flops: float = None

    wandb: object = None  # the Weights & Biases run (--wandb, rank 0)

    def log(self, line):
        checkpoints.append_log(self.log_file, line)

    def metrics(self, step, **values):
        """Step, lr, norm, speed and evaluation figures to Weights & Biases, with --wandb (rank 0)."""
        if self.wandb is not None:
            self.wandb.log(values, step=step)


@dataclass
class Inputs:
    """What the user gave, checked: the micro-batch sizes to try, the loaders, the tokenizer, the model's
    config, and the checkpoint to resume (None: a fresh start) with notes on what changed since."""
    candidates: list
    train_loader: object
    val_loader: object
    enc: object
    config: GPTConfig
    ckpt: dict
    notes: list
    data_identity: dict  # the shards' names, sizes and fingerprints, saved in checkpoints
    val_tokens: torch.Tensor = None  # --val_tokens: the first val tokens, read once
    core_bundle: tuple = None  # --core_every: CORE's bundle (path, official), checked


def check_inputs(args, compute):
    """Every check of what the user gave (flags, data, tokenizer, checkpoint): nothing is written to --log_dir
    before they all pass (only HellaSwag's and CORE's caches may be filled), and none of them waits for the other
    ranks."""
    candidates = micro_batch_sizes(args, compute)
    if args.batch_size != "auto":
        check_cuda_graphs(args, compute, args.batch_size)
    config = gpt_config(args)
    with torch.device("meta"):  # the parameter count, with nothing allocated (GPT-2 XL's 1.56B included)
        n_params = GPT(config).num_params(non_embedding=False)
    speed.check_memory(n_params, config, args, compute.device_type, compute.world_size, compute.dtype, candidates[-1],
                       optimizer_moments=1 if args.optimizer == "muon" else 2)
    # with -B auto, the data is checked at the smallest candidate and the loaders made again once B is known
    train_loader, val_loader = make_loaders(args, compute, candidates[-1])
    enc = load_eval_data(args)
    checkpoints.check_not_diverged(args)
    ckpt = checkpoints.find_resume_checkpoint(args, "cpu")
    identity = checkpoints.data_identity({"train": train_loader, "val": val_loader})
    notes = []
    if ckpt:
        notes = (checkpoints.check_resumable(ckpt, config, args, compute.world_size)
                 + checkpoints.check_same_data(ckpt, identity, args))
    if args.wandb and compute.master:
        common.import_wandb()  # installed? (before anything is written)
    val_tokens = first_val_tokens(val_loader, args.val_tokens, args.vocab_size) if args.val_tokens else None
    return Inputs(candidates, train_loader, val_loader, enc, config, ckpt, notes, identity, val_tokens,
                  core_bundle=load_core_bundle(args, compute))


def gpt_config(args):
    """The model the flags describe."""
    return GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
                     n_embd=args.n_embd, arch=args.arch, untie_head=args.untie_head, bias=args.bias, rotary=args.rotary,
                     attn_scale=args.attn_scale, embed_norm=args.embed_norm, logit_softcap=args.logit_softcap,
                     attention=args.attention, ce_chunk_rows=args.chunked_ce)


def setup_run(args, compute, inputs, was_ours):
    """With the inputs checked: the log, the process group, the model, the optimizer and the loaders, and
    the resumed state if there is one. None when the run in --log_dir is finished already."""
    ckpt, config, train_loader, val_loader = inputs.ckpt, inputs.config, inputs.train_loader, inputs.val_loader
    start_step = ckpt["step"] if ckpt else 0
    if done := run_complete(args, ckpt):
        compute.print0(done)
        return None
    # a run that was killed before its first checkpoint starts over: say so
    restart = not ckpt and args.resume == "auto" and os.path.exists(os.path.join(args.log_dir, "log.txt"))
    log_file = (checkpoints.prepare_log_dir(args, ckpt and ckpt["path"], start_step if ckpt else None, was_ours)
                if compute.master and not args.benchmark else None)
    if restart and not args.overwrite:
        compute.print0(f"no checkpoint in {args.log_dir} yet: starting at step 0")
    init_distributed(compute, start_step)

    raw_model, model, optimizer = build_model(args, config, compute)
    if args.batch_size == "auto":
        args.batch_size = speed.auto_micro_batch(model, raw_model, inputs.candidates, args.seq_len,
                                                 compute.autocast_ctx, compute.device, compute.ddp)  # recorded
        check_cuda_graphs(args, compute, args.batch_size)
        train_loader, val_loader = make_loaders(args, compute, args.batch_size)
    # the loop reads batches through these: on the device, the next one already on its way
    train_batches = speed.DevicePrefetcher(train_loader, compute.device, args.prefetch)
    val_batches = speed.DevicePrefetcher(val_loader, compute.device, args.prefetch)
    checkpointer = checkpoints.Checkpointer(args, raw_model, optimizer, {"train": train_batches, "val": val_batches},
                                            start_step, compute.master, compute.world_size, inputs.data_identity)
    val_loss = checkpointer.restore(ckpt) if ckpt else None
    if compute.ddp and not args.fsdp:
        # the buffers (rotary tables) are constants: re-sending them at every forward would only cost time, and
        # hang an evaluation whose ranks run different numbers of forwards
        model = DDP(model, device_ids=[compute.local_rank] if compute.device_type == "cuda" else None,
                    broadcast_buffers=False)
    # HellaSwag batches vary in shape: a compiled graph of its own, with dynamic shapes, on the same weights
    # (under --fsdp the blocks are compiled already)
    compiled = compute.use_compile and not args.fsdp
    hidden = torch.compile(raw_model.hidden_states, dynamic=True) if compiled else raw_model.hidden_states
    run = Run(args, compute, raw_model, model, optimizer, train_batches, val_batches,
              hellaswag.Model(hidden, raw_model.logits, config.block_size), inputs.enc, inputs.val_tokens,
              grad_accum_steps=accumulation_steps(args, compute, args.batch_size),
              start_step=start_step, checkpointer=checkpointer, log_file=log_file, val_loss=val_loss,
              flops_per_token=raw_model.flops_per_token(args.seq_len),
              peak_flops=speed.device_peak_flops(compute.device_type, args.peak_tflops), core_bundle=inputs.core_bundle)
    describe_run(run, ckpt["path"] if ckpt else None, inputs.notes)
    if args.wandb and compute.master:
        wandb_id = ckpt.get("wandb_id") if ckpt else None  # resumed: the same W&B run goes on
        run.wandb = common.import_wandb().init(
            project=args.wandb_project, config=vars(args), id=wandb_id, resume="allow" if wandb_id else None,
            name=args.wandb_run_name or os.path.basename(os.path.abspath(args.log_dir)))
        checkpointer.wandb_id = run.wandb.id
    return run


def run_complete(args, ckpt):
    """The line saying so when --log_dir holds this run finished already (its log reaches --max_steps), or None."""
    if ckpt and args.resume == "auto" and (last := checkpoints.finished_at(args.log_dir, args.max_steps)) is not None:
        return (f"{args.log_dir} holds a complete run (its log reaches step {last}, --max_steps is "
                f"{args.max_steps}); nothing to do. Pass a larger --max_steps to train on")
    return None


def accumulation_steps(args, compute, B):
    """Micro-steps per optimizer step: the total batch over what all processes take in one micro-step."""
    return args.total_batch_size // (B * args.seq_len * compute.world_size)


def check_cuda_graphs(args, compute, B):
    """--compile_mode reduce-overhead and max-autotune capture CUDA graphs, which overwrite the .grad tensors
    they allocated during capture: gradients accumulated over several micro-steps would be lost (torch's
    _inductor/cudagraph_trees.py). Refused unless each step is one micro-step."""
    accum = accumulation_steps(args, compute, B)
    if compute.use_compile and args.compile_mode in ("reduce-overhead", "max-autotune") and accum > 1:
        raise UserError(f"--compile_mode {args.compile_mode} captures CUDA graphs, which lose gradients accumulated "
                        f"over micro-steps, and -B {B} needs {accum} of them per step; use --compile_mode "
                        "max-autotune-no-cudagraphs (or default), or a -B that makes one micro-step per step")


def micro_batch_sizes(args, compute):
    """The micro-batch sizes to try, largest first: -B itself, or with -B auto every one that divides the batch."""
    T, W = args.seq_len, compute.world_size
    if args.batch_size != "auto":
        if args.total_batch_size % (args.batch_size * T * W) != 0:
            raise UserError(f"--total_batch_size {args.total_batch_size} is not a multiple of B*T*processes = "
                            f"{args.batch_size}*{T}*{W} = {args.batch_size * T * W}; "
                            "change -B, -T or --total_batch_size")
        return [args.batch_size]
    if compute.device_type != "cuda":
        raise UserError(f"-B auto measures GPU memory, and this run is on {compute.device_type}; pass a number, "
                        "e.g. -B 8")
    candidates = speed.micro_batch_candidates(args.total_batch_size, T, W)
    if not candidates:
        raise UserError(f"--total_batch_size {args.total_batch_size} is not a multiple of T*processes = "
                        f"{T}*{W}; change -T or --total_batch_size")
    return candidates


def make_loaders(args, compute, B):
    """The train and val loaders at micro-batch B: the shards in --data_dir, or random tokens (--synthetic)."""
    T, rank, W = args.seq_len, compute.rank, compute.world_size
    if args.synthetic:  # the tokenizer's ids: the padding past them never occurs in real data
        V = min(args.vocab_size, EOT + 1)
        return (speed.SyntheticLoader(B, T, rank, W, "train", V, args.seed),
                speed.SyntheticLoader(B, T, rank, W, "val", V, args.seed))
    return (DataLoaderLite(B, T, rank, W, "train", args.data_dir, args.vocab_size, shuffle=args.shuffle,
                           seed=args.seed),
            DataLoaderLite(B, T, rank, W, "val", args.data_dir, args.vocab_size))


def load_eval_data(args):
    """The tokenizer (for samples and HellaSwag) and HellaSwag's val file, now, so that a missing one fails
    before training starts, in one message naming every one that is missing. Returns the tokenizer, or None
    when neither needs it."""
    enc, missing = None, []
    try:
        if args.sample or args.hellaswag:
            enc = common.get_encoder()
    except UserError as e:
        missing.append(f"{e} (or pass --no-sample --no-hellaswag)")
    try:
        if args.hellaswag:
            for _ in hellaswag.iterate_examples("val"):  # downloads it once; a damaged file fails here, not later
                pass
    except UserError as e:
        missing.append(f"{e} (or pass --no-hellaswag)")
    if missing:
        raise UserError("; and ".join(missing))
    return enc


def load_core_bundle(args, compute):
    """--core_every: CORE's bundle downloaded (once) and checked, and this rank's items rendered, now: a missing or
    damaged bundle, or a --core_max_per_task too small for a task's few-shot prompts, fails before training."""
    if not args.core_every:
        return None
    try:
        path, official = core.bundle_path(args.core_bundle)
        core.rendered_tasks(path, official, args.core_max_per_task, compute.rank, compute.world_size, args.block_size)
    except UserError as e:
        raise UserError(f"{e} (or leave out --core_every)") from None
    return path, official


PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # 20x that worst case; a real hang still ends


def init_distributed(compute, start_step):
    """The process group (NCCL between GPUs, gloo on CPU); every rank must resume from the same step."""
    if not compute.ddp:
        return
    if not dist.is_initialized():  # (the preflight starts it earlier, and sets up a second run in one process)
        # the longest a rank waits at a collective for another: rank 0 writing a checkpoint (GPT-2 XL's, weights
        # and AdamW moments, is 18.7 GB: about 90 s at 200 MB/s) while the others wait at the next all-reduce
        dist.init_process_group(backend="nccl" if compute.device_type == "cuda" else "gloo",
                                timeout=PROCESS_GROUP_TIMEOUT)
        runtime.exit_when_another_rank_fails(f"rank {compute.rank}")  # a rank failing alone must not hang the rest
    steps = torch.tensor([start_step, -start_step], dtype=torch.float32, device=compute.device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if steps[0].item() != -steps[1].item():
        raise UserError(f"the ranks found different checkpoints (steps {-steps[1].item():.0f} to "
                        f"{steps[0].item():.0f}): --log_dir must be storage that every node shares")


def build_model(args, config, compute):
    """The model from the seed, and its optimizer. Returns (plain module, module that trains, optimizer)."""
    torch.manual_seed(args.seed)
    if compute.device_type == "cuda":
        torch.cuda.manual_seed(args.seed)
        # TF32 matmuls (10-bit mantissa inputs, fp32 accumulation); CPU matmuls stay full fp32
        torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    raw_model = GPT(config).to(compute.device)
    if args.recompute:
        speed.recompute_blocks(raw_model)
    if args.fsdp:  # each rank keeps its 1/N of every weight from here on; compiled block by block
        sharding.shard_model(raw_model, args.compile_mode if compute.use_compile else None)
    if args.optimizer == "muon":
        fused = (compute.device_type == "cuda") if args.fused_adamw is None else args.fused_adamw
        optimizer = variants.muon_optimizers(raw_model, args, fused)
    else:
        optimizer = raw_model.configure_optimizers(args.weight_decay, args.max_lr, compute.device_type,
                                                   args.fused_adamw, args.adam_betas, args.adam_eps)
    whole = compute.use_compile and not args.fsdp
    model = torch.compile(raw_model, mode=args.compile_mode) if whole else raw_model
    return raw_model, model, optimizer


def describe_run(run, resumed_from, notes):
    """Rank 0 prints what is about to run: device, model size, batch arithmetic, data, and any resume."""
    args, compute, optimizer = run.args, run.compute, run.optimizer
    B, T, W = args.batch_size, args.seq_len, compute.world_size
    n_decay = sum(p.numel() for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"])
    n_params = run.raw_model.num_params(non_embedding=False)
    compute.print0(f"device {compute.device} | dtype {compute.dtype} | compile {compute.use_compile}"
                   + (f" ({args.compile_mode})" if compute.use_compile else "") + f" | processes {W}"
                   + (" (FSDP: sharded)" if args.fsdp else "") + (" | recompute" if args.recompute else "")
                   + " | attention "
                   f"{args.attention} ({args.sdpa_backend}) | fused AdamW {optimizer.defaults.get('fused') or False} | "
                   f"chunked CE {args.chunked_ce or 'off'} | prefetch {args.prefetch}"
                   + (f" | keep freed memory {compute.keeps_freed_memory}" if compute.device_type == "cpu" else ""))
    compute.print0(f"recipe {args.recipe}: arch {args.arch}{' (untied head)' if args.untie_head else ''} | "
                   f"optimizer {args.optimizer} | schedule {args.schedule}")
    compute.print0(f"model: {n_params:,} parameters ({n_decay:,} decayed, {n_params - n_decay:,} not)")
    compute.print0(f"total batch {args.total_batch_size:,} tokens = {B} x {T} x {W} processes "
                   f"x {run.grad_accum_steps} accumulation steps")
    train_loader, val_loader = run.train_batches.loader, run.val_batches.loader
    compute.print0("data: random tokens (--synthetic)" if args.synthetic else
                   f"train shards {len(train_loader.shards)}, val shards {len(val_loader.shards)} in {args.data_dir}"
                   + (f"; val loss over the first {args.val_tokens:,} val tokens" if args.val_tokens else ""))
    for path in train_loader.skipped + val_loader.skipped:
        compute.print0(f"note: skipping {path}: shorter than one batch of {B}x{T}x{W}+1 tokens")
    if run.peak_flops is None:
        compute.print0("MFU not shown: peak FLOP/s of this device unknown (pass --peak_tflops)")
    else:
        compute.print0(f"MFU against {speed.peak_flops_source(compute.device_type, args.peak_tflops)}")
    if args.hellaswag and compute.master and (note := hellaswag.not_the_real_val_set()):  # (hashes the file)
        print(f"note: {note}")
    if run.core_bundle and not run.core_bundle[1]:
        compute.print0(f"note: CORE on {run.core_bundle[0]}, not nanochat's bundle as downloaded: its scores compare "
                       "only with scores on it")
    if resumed_from:
        compute.print0(f"resuming at step {run.start_step} from {resumed_from}")
    for note in notes:
        compute.print0(f"note: {note}")


# -----------------------------------------------------------------------------
# Flags and main


def float_tuple(n):
    def parse(value):
        try:
            values = tuple(common.finite_float(v) for v in value.split(","))
        except argparse.ArgumentTypeError:
            values = ()
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {value!r}")
        return values
    return parse


float_pair, float_triple = float_tuple(2), float_tuple(3)


def micro_batch_size(value):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from None


# --model: GPT-2's four sizes (layers x width, heads of 64), each with the peak learning rate and batch of
# the nearest model in the GPT-3 paper's table 2.1 (Small 125M 6e-4 and 0.5M tokens, Medium 350M 3e-4 and
# 0.5M, Large 760M 2.5e-4 and 0.5M, XL 1.3B 2e-4 and 1M), over the same 10B tokens and 375M of warmup
MODELS = {
    "gpt2": {},  # the flags' own defaults: 12 x 768, 12 heads (and a recipe's own sizes stay, e.g. 6 heads)
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, max_lr=3e-4),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20, max_lr=2.5e-4),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25, max_lr=2e-4, total_batch_size=2**20, max_steps=9537,
                    warmup_steps=358),
}

# --first_try: a 4-layer, 128-wide GPT on Tiny Shakespeare (`python fineweb.py --dataset shakespeare`), a few
# minutes on a laptop's CPU; HellaSwag on its first 200 examples
FIRST_TRY = dict(data_dir="tinyshakespeare", n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16,
                 seq_len=128, total_batch_size=2048, max_steps=200, warmup_steps=20, eval_every=50, val_steps=10,
                 hellaswag_limit=200, checkpoint_every=100, save_every=50)


def add_recipe_flags(p):
    """The recipe's flags: data, batch, optimization, evaluation, checkpoints, the model."""
    p.add_argument("--model", choices=list(MODELS), default="gpt2",
                   help="GPT-2's size: gpt2 124M (12 x 768), gpt2-medium 355M (24 x 1024, max_lr 3e-4), gpt2-large "
                        "774M (36 x 1280, 2.5e-4), gpt2-xl 1558M (48 x 1600, 2e-4 and 2**20-token steps: 9537 of "
                        "them, 358 of warmup); the lr and batch from GPT-3's table for the nearest size; flags given "
                        "still win")
    p.add_argument("--first_try", action="store_true",
                   help="a tiny model on Tiny Shakespeare, minutes on a CPU: sets the data, model, batch and "
                        "evaluation flags (those given still win)")
    g = p.add_argument_group("data and output")
    g.add_argument("--data_dir", default="edu_fineweb10B",
                   help="folder of *_train_* / *_val_* shards, .npy (build-nanogpt) or .bin (llm.c)")
    g.add_argument("--log_dir", default="log", help="log.txt and model_*.pt go here")
    g.add_argument("--overwrite", action="store_true", help="start over in a --log_dir that already holds a run")
    g.add_argument("--new_data", action="store_true",
                   help="resume onto other shards than the checkpoint's, read from their start (changes the run)")
    g.add_argument("--shuffle", action="store_true",
                   help="each epoch: shards and the documents in them in a seeded random order (changes the math)")
    g = p.add_argument_group("batch")
    g.add_argument("-B", "--batch_size", type=micro_batch_size, default=64,
                   help="micro-batch size per process, or auto: the largest that fits in GPU memory (CUDA)")
    g.add_argument("-T", "--seq_len", type=int, default=1024, help="sequence length")
    g.add_argument("--total_batch_size", type=int, default=524288, help="tokens per optimizer step (2**19)")
    g = p.add_argument_group("optimization")
    g.add_argument("--max_steps", type=int, default=19073, help="10B tokens / 2**19 tokens per step")
    g.add_argument("--warmup_steps", type=int, default=715, help="375M tokens, as in GPT-3")
    g.add_argument("--max_lr", type=common.finite_float, default=6e-4, help="peak learning rate (GPT-3 Small's)")
    g.add_argument("--min_lr_ratio", type=common.finite_float, default=0.1, help="min_lr = max_lr * this")
    g.add_argument("--weight_decay", type=common.finite_float, default=0.1, help="AdamW decay of the 2-D tensors only")
    g.add_argument("--grad_clip", type=common.finite_float, default=1.0, help="clip the global gradient norm to this")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval_every", type=int, default=250, help="val loss, HellaSwag and samples every N steps")
    g.add_argument("--val_steps", type=int, default=20, help="val batches per evaluation, per process")
    g.add_argument("--val_tokens", type=int, default=0,
                   help="instead: the val loss over exactly the first N val tokens (a multiple of -T), split "
                        "across processes, the same whatever -B and their number (the speedrun's 10,485,760)")
    g.add_argument("--hellaswag", action=argparse.BooleanOptionalAction, default=True,
                   help="HellaSwag acc_norm at every evaluation, split across processes")
    g.add_argument("--hellaswag_limit", type=int, default=None, help="score only the first N val examples")
    g.add_argument("--hellaswag_batch_tokens", type=int, default=8192,
                   help="HellaSwag tokens per forward pass (0: one example at a time, build-nanogpt's way)")
    g.add_argument("--core_every", type=int, default=0,
                   help="CORE (core.py: nanochat's 22 tasks) every N steps and at the last, logged as core lines (0: "
                        "off)")
    g.add_argument("--core_max_per_task", type=int, default=500,
                   help="CORE's examples per task while training (nanochat's 500; core.py scores all of them)")
    g.add_argument("--core_bundle", default=None,
                   help="CORE's eval_bundle.zip (default: nanochat's, downloaded once into $CORE_CACHE_DIR or "
                        "./core_bundle)")
    g.add_argument("--sample", action=argparse.BooleanOptionalAction, default=True,
                   help="print 4 samples at every evaluation")
    g.add_argument("--checkpoint_every", type=int, default=5000,
                   help="milestone log/model_{step}.pt every N steps and at the last (kept)")
    g = p.add_argument_group("resuming")
    g.add_argument("--resume", default="auto",
                   help="auto: continue from the newest checkpoint in --log_dir, if any; none: start fresh; "
                        "or the path of a checkpoint")
    g.add_argument("--save_every", type=int, default=1000, help="resume checkpoint log/ckpt_{step}.pt every N "
                                                                 "steps (0: off)")
    g.add_argument("--save_every_minutes", type=common.finite_float, default=0, help="also every M minutes (0: off)")
    g.add_argument("--keep_last", type=int, default=2, help="how many ckpt_*.pt to keep (milestones always stay)")
    g = p.add_argument_group("model")
    g.add_argument("--n_layer", type=int, default=12, help="transformer blocks")
    g.add_argument("--n_head", type=int, default=12, help="attention heads")
    g.add_argument("--n_embd", type=int, default=768, help="width of the residual stream")
    g.add_argument("--block_size", type=int, default=1024, help="longest context (positions learned)")
    g.add_argument("--vocab_size", type=int, default=50304, help="50257 padded to a multiple of 128 for speed")


def add_variant_flags(p):
    """Beyond GPT-2's recipe (variants.py): each changes the math, none is on by default."""
    g = p.add_argument_group("beyond GPT-2: architecture, optimizer, schedule (opt-in)")
    g.add_argument("--recipe", choices=list(variants.RECIPES), default="gpt2",
                   help="presets for the flags of this group and their learning rates: gpt2 (the defaults), llama "
                        "(Llama blocks), speedrun (modded-nanogpt's modern blocks + Muon + WSD, 4578 steps), "
                        "speedrun-simple (its plain-PyTorch reference: 3250 steps, 1.70B tokens to val loss 3.28)")
    g.add_argument("--arch", choices=variants.ARCHS, default="gpt2",
                   help="llama: RoPE, RMSNorm, SwiGLU; modern: RoPE, RMSNorm, QK-norm, ReLU^2, zero-init projections; "
                        "simple: modern with RMSNorm gains and the speedrun reference's init")
    g.add_argument("--untie_head", action=argparse.BooleanOptionalAction, default=False,
                   help="llama/modern/simple: lm_head its own matrix, zero at init")
    g.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False,
                   help="llama/modern/simple: biases in every linear and the head")
    g.add_argument("--rotary", choices=["full", "half"], default="full",
                   help="half: the speedrun's half-truncated rotary (a quarter of the frequencies, 1 to 1/1024)")
    g.add_argument("--attn_scale", type=common.finite_float, default=0.0,
                   help="attention scores times this (0: 1/sqrt(head size)); the speedrun-simple's 0.12")
    g.add_argument("--embed_norm", action=argparse.BooleanOptionalAction, default=False,
                   help="llama/modern/simple: an RMSNorm right after the embedding")
    g.add_argument("--logit_softcap", type=common.finite_float, default=0.0,
                   help="logits squashed into (-cap, cap) by cap * x / sqrt(x^2 + cap^2) (0: off)")
    g.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw",
                   help="muon: Muon at --max_lr on the blocks' matrices, AdamW on embedding, head, norms, biases")
    g.add_argument("--adam_lr", type=common.finite_float, default=0.008,
                   help="muon: AdamW's peak lr for head, norms, biases")
    g.add_argument("--embed_lr", type=common.finite_float, default=0.6,
                   help="muon with --untie_head: the embedding's peak lr")
    g.add_argument("--scalar_lr", type=common.finite_float, default=None,
                   help="muon: AdamW's peak lr for gains and biases (default: --adam_lr)")
    g.add_argument("--adam_weight_decay", type=common.finite_float, default=None,
                   help="muon: AdamW's weight decay on all its groups (default: --weight_decay on 2-D ones only)")
    g.add_argument("--adam_betas", type=float_pair, default=(0.9, 0.95), help="AdamW's betas, B1,B2")
    g.add_argument("--adam_eps", type=common.finite_float, default=1e-8, help="AdamW's eps")
    g.add_argument("--muon_ns_coefficients", type=float_triple, default=(3.4445, -4.775, 2.0315),
                   help="muon: the Newton-Schulz iteration's A,B,C (torch.optim.Muon's default)")
    g.add_argument("--muon_ns_steps", type=int, default=5, help="muon: Newton-Schulz iterations")
    g.add_argument("--muon_momentum_warmup", type=int, default=300,
                   help="muon: momentum from 0.85 up to 0.95 over this many steps (0: 0.95 throughout)")
    g.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                   help="wsd: warmup, then --max_lr, then a linear cooldown to the min lr")
    g.add_argument("--cooldown_frac", type=common.finite_float, default=0.28,
                   help="wsd: the share of steps spent cooling down")


def add_system_flags(p):
    """How to run it: device, precision, speed switches, benchmarking."""
    g = p.add_argument_group("system")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default: bf16 on CUDA GPUs that support it, else fp32)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--compile_mode", default="default", choices=speed.COMPILE_MODES, help="torch.compile's mode")
    g.add_argument("--peak_tflops", type=common.finite_float, default=None,
                   help="device peak for MFU, if not in the table")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    g.add_argument("--fused_adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="the fused AdamW kernel (default: on for CUDA)")
    g.add_argument("--attention", choices=["sdpa", "manual"], default="sdpa",
                   help="sdpa: flash attention; manual: the (T, T) matrix written out (same math)")
    g.add_argument("--sdpa_backend", choices=list(speed.SDPA_BACKENDS), default="auto",
                   help="the kernel behind scaled_dot_product_attention, with math for the calls it refuses "
                        "(auto: torch's choice; cudnn, efficient: CUDA only)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the weights, gradients and optimizer state across the processes "
                        "(FSDP2, block by block; DDP's precision: fp32 weights, gathers and reductions, bf16 "
                        "matmuls by autocast), for models that do not fit under DDP; resume points become sharded "
                        "folders that resume at any process count")
    g.add_argument("--recompute", action="store_true",
                   help="activation checkpointing: each block's activations recomputed in the backward pass instead "
                        "of kept (less memory, about a third more compute; same math)")
    g.add_argument("--chunked_ce", type=int, default=0, metavar="ROWS",
                   help="lm_head + loss ROWS rows at a time, never the whole batch's logits (0: off; same math)")
    g.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="load the next batch (pinned, non-blocking on CUDA) while the device works")
    g.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU (Linux, glibc): freed memory stays in the process for the next step instead of "
                        "going back to the kernel; measured: --first_try 1.6x faster, peak memory +21%% (+9%% at 124M)")
    g = p.add_argument_group("logging")
    g.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases (rank 0): losses, HellaSwag, lr, norm, tok/s, MFU; pip install "
                        "wandb; WANDB_MODE=offline logs without an account")
    g.add_argument("--wandb_project", default="gpt2-repro", help="the W&B project")
    g.add_argument("--wandb_run_name", default=None, help="the W&B run's name (default: --log_dir's name)")
    g = p.add_argument_group("benchmarking")
    g.add_argument("--synthetic", action="store_true", help="random tokens instead of --data_dir's shards")
    g.add_argument("--benchmark", action="store_true",
                   help="measure speed: --synthetic data, no evaluation, log or checkpoints; --max_steps steps, "
                        "then one summary line (median ms/step after warm-up, tok/s, MFU, peak memory)")
    g.add_argument("--seed", type=int, default=1337, help="model init and --shuffle")
    g.add_argument("--preflight", action="store_true",
                   help="prove this run in a minute: every phase once (steps, evaluation, a save and resume, the "
                        "ranks' link) in a temporary folder, nothing written to --log_dir; then its speed, memory, "
                        "and projected time and disk; exit 0 if all passed")


def parse_args(argv=None):
    p = common.ArgumentParser(description="Train GPT-2 from scratch; the defaults are the GPT-2 124M recipe.")
    add_recipe_flags(p)
    add_variant_flags(p)
    add_system_flags(p)
    known = p.parse_known_args(argv)[0]
    if known.model != "gpt2" and known.recipe not in ("gpt2", "llama"):
        p.error(f"--model {known.model} sets GPT-2's sizes with GPT-3's AdamW learning rates; --recipe {known.recipe}"
                " is tuned at 124M only: use --recipe gpt2 or llama, or set the sizes with --n_layer/--n_embd/--n_head")
    # presets first (the recipe, the size, the first try), then what the command line says wins
    p.set_defaults(**{**variants.RECIPES[known.recipe], **MODELS[known.model],
                      **(FIRST_TRY if known.first_try else {})})
    args = p.parse_args(argv)
    fit_presets(p, args, p.given(argv))

    positive = ["seq_len", "total_batch_size", "max_steps", "eval_every",
                "val_steps", "checkpoint_every", "n_layer", "n_head", "n_embd", "block_size", "vocab_size"]
    if args.batch_size != "auto":
        positive.append("batch_size")
    for name in positive:
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.chunked_ce < 0:
        p.error("--chunked_ce must be >= 0")
    if args.seq_len > args.block_size:
        p.error(f"-T/--seq_len {args.seq_len} is longer than --block_size {args.block_size}")
    if args.warmup_steps >= args.max_steps:
        p.error(f"--warmup_steps {args.warmup_steps} must be below --max_steps {args.max_steps}")
    if args.warmup_steps < 0:
        p.error(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if args.arch == "gpt2" and (args.untie_head or args.bias or args.embed_norm or args.rotary != "full"):
        p.error("--untie_head, --bias, --embed_norm and --rotary are for --arch llama, modern or simple; GPT-2 ties "
                "its head, has biases and learned positions")
    if args.adam_lr <= 0 or args.embed_lr <= 0 or not 0 < args.cooldown_frac <= 1:
        p.error("--adam_lr and --embed_lr must be positive, --cooldown_frac within (0, 1]")
    if args.max_lr <= 0 or not 0 <= args.min_lr_ratio <= 1:
        p.error("--max_lr must be positive and --min_lr_ratio within [0, 1]")
    if args.weight_decay < 0 or args.grad_clip < 0:
        p.error("--weight_decay must be >= 0 and --grad_clip >= 0 (0: no clipping; a negative clip would turn the "
                "gradient around)")
    check_variant_flags(p, args)
    if args.n_embd % args.n_head != 0:
        p.error(f"--n_embd {args.n_embd} must be a multiple of --n_head {args.n_head}")
    if args.seed < 0 or (args.peak_tflops is not None and args.peak_tflops <= 0):
        p.error("--seed must be >= 0 and --peak_tflops positive")
    if args.hellaswag_limit is not None and args.hellaswag_limit <= 0:
        p.error("--hellaswag_limit must be positive")
    if args.hellaswag_batch_tokens < 0 or args.core_every < 0 or args.core_max_per_task <= 0:
        p.error("--hellaswag_batch_tokens and --core_every must be >= 0, --core_max_per_task positive")
    if args.save_every < 0 or args.save_every_minutes < 0 or args.keep_last < 1:
        p.error("--save_every and --save_every_minutes must be >= 0, --keep_last >= 1")
    if args.fsdp and (args.batch_size == "auto" or args.compile_mode in ("reduce-overhead", "max-autotune")):
        p.error("--fsdp gathers each block's weights in collectives that every process must reach together: -B "
                "auto's out-of-memory probes and CUDA graphs (--compile_mode reduce-overhead, max-autotune) would "
                "part them; pass a number to -B and another --compile_mode")
    if args.preflight and args.benchmark:
        p.error("--preflight measures speed too, and runs every phase; drop --benchmark")
    if args.benchmark:  # speed only: nothing read from or written to disk, nothing but training steps
        args.synthetic, args.hellaswag, args.sample, args.resume, args.val_tokens = True, False, False, "none", 0
        args.core_every = 0
    return args


def fit_presets(p, args, given):
    """A preset's value that the user's own flags make impossible is scaled to fit them, with a note: the
    warmup (GPT-2's 715 steps, --first_try's 20) to a shorter --max_steps, in proportion, and the micro-batch
    to the number of torchrun processes. What the command line names itself is never changed."""
    changed = []
    preset_steps = p.get_default("max_steps")
    if "warmup_steps" not in given and args.warmup_steps >= args.max_steps and preset_steps > args.max_steps:
        warmup = min(args.max_steps - 1, args.warmup_steps * args.max_steps // preset_steps)
        changed.append(f"--warmup_steps {args.warmup_steps} -> {warmup} (the preset's share of its {preset_steps} "
                       f"steps, for --max_steps {args.max_steps})")
        args.warmup_steps = warmup
    W = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's processes
    B, T = args.batch_size, args.seq_len
    if "batch_size" not in given and B != "auto" and T > 0 and args.total_batch_size % (B * T * W):
        fits = [b for b in speed.micro_batch_candidates(args.total_batch_size, T, W) if b < B]
        if fits:
            changed.append(f"-B {B} -> {fits[0]} ({args.total_batch_size:,} tokens per step across {W} processes)")
            args.batch_size = fits[0]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: the presets fitted to your flags: {'; '.join(changed)}; pass them to choose")


def check_variant_flags(p, args):
    """The flags beyond GPT-2's that only make sense together, and the val_tokens arithmetic."""
    if args.attn_scale < 0 or args.logit_softcap < 0 or args.adam_eps <= 0 or args.muon_ns_steps < 1:
        p.error("--attn_scale and --logit_softcap must be >= 0, --adam_eps positive, --muon_ns_steps >= 1")
    if args.chunked_ce and (args.logit_softcap or args.bias):
        p.error("--chunked_ce computes lm_head's matmul alone: it has no --logit_softcap or head --bias; drop one")
    if not all(0 <= b < 1 for b in args.adam_betas) or args.muon_momentum_warmup < 0:
        p.error("--adam_betas must be within [0, 1), --muon_momentum_warmup >= 0")
    if (args.scalar_lr is not None and args.scalar_lr <= 0) or (args.adam_weight_decay or 0) < 0:
        p.error("--scalar_lr must be positive, --adam_weight_decay >= 0")
    if args.val_tokens < 0:
        p.error(f"--val_tokens {args.val_tokens} must not be negative: 0 (the default) is --val_steps batches, N the "
                "first N val tokens")
    if args.val_tokens % args.seq_len:
        p.error(f"--val_tokens {args.val_tokens} must be a multiple of -T {args.seq_len} (whole sequences), or 0")


def out_of_memory_error(args, e):
    """The one-line error for running out of memory mid-run (-B 64, the default, does not fit a 40 GB card): the
    device's memory it ran out of, the allocator's words whole (the byte count never cut), and the fixes that
    apply there (-B auto measures GPU memory only)."""
    e = speed.out_of_memory(e) or e  # the error itself, not the compiler's wrapper around it
    where = "GPU memory" if isinstance(e, torch.cuda.OutOfMemoryError) else "memory on the CPU"
    detail = speed.allocation_failure(e)
    B = args.batch_size
    if B == "auto":
        return UserError(f"out of {where} ({detail}); use a smaller model or -T")
    smaller = next((b for b in range(B // 2, 0, -1) if args.total_batch_size % (b * args.seq_len) == 0), 1)
    auto = " or -B auto, which finds the largest that fits" if where == "GPU memory" else ""
    return UserError(f"out of {where} at -B {B} ({detail}); pass -B {smaller} (the same --total_batch_size, with "
                     f"more accumulation steps){auto}")


def main(argv=None):
    args = parse_args(argv)
    try:
        try:
            # the preflight drives this module's own phases (passed in: machinery does not import the recipe)
            code = preflight.run(args, sys.modules[__name__]) if args.preflight else train(args)
        except Exception as e:  # out of memory: here, or inside a compilation that wraps it
            if isinstance(e, UserError) or not speed.out_of_memory(e):
                raise
            raise out_of_memory_error(args, e) from None
    except UserError as e:
        if dist.is_initialized() and not isinstance(e, common.AnotherRankFailed):  # (that one knows already)
            runtime.tell_other_ranks(str(e))
        if e.exit_code != 1:  # 3: the run diverged (common.RunDiverged), which a restart loop should not rerun
            common.print_line(f"train_gpt2.py: error: {e}")
            sys.exit(e.exit_code)
        sys.exit(f"train_gpt2.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C before training began: nothing to save
        common.print_line("train_gpt2.py: interrupted before training began")
        sys.exit(128 + signal.SIGINT)
    sys.exit(code)


if __name__ == "__main__":
    common.run_main(main)
