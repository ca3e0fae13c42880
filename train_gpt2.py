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
import json
import math
import os
import pickle
import random
import re
import signal
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
from fineweb import BIN_MAGIC, BIN_VERSION, first_line  # the shard writer's format, and its one-line errors


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file); printed as one line, no traceback."""


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
    def __init__(self, config, attention="sdpa"):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise UserError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        # query, key and value for all heads in one matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True  # this projection adds into the residual stream
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attention = attention  # "sdpa", or "manual": the same math with the (T, T) matrix written out

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:  # generation: keys and values of the earlier tokens are kept, not recomputed
            if "k" in cache:
                k = torch.cat((cache["k"], k), dim=2)
                v = torch.cat((cache["v"], v), dim=2)
            cache["k"], cache["v"] = k, v
        if self.attention == "sdpa" and k.size(2) == T:
            # flash attention: the (T, T) attention matrix is never written to memory
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # each query sees the cached keys and the causal part of the new ones
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
            if self.attention == "manual":  # the textbook way, written out: the speed ladder's baseline
                att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
                y = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
    def __init__(self, config, attention="sdpa"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, attention)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        # pre-norm: the residual stream itself is never normalised, only what branches off it
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class ChunkedCrossEntropy(torch.autograd.Function):
    """
    lm_head and the mean cross-entropy together, `chunk_rows` rows at a time, so the (B*T, vocab)
    logits (6.6 GB in bf16 at B=64, twice that as the fp32 copy the loss is taken on) never exist
    whole. Each chunk's gradients are made while its logits are at hand; backward only scales them.
    Under autocast the matmuls run in its dtype and the softmax in fp32, as with lm_head + F.cross_entropy.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows, grad_enabled):
        n = h.size(0)
        # needs_input_grad stays True under no_grad (evaluation): only make gradients when they will be used
        want_h = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        for i in range(0, n, chunk_rows):
            h_chunk, t_chunk = h[i:i + chunk_rows], targets[i:i + chunk_rows]
            logits = (h_chunk @ weight.t()).float()
            loss += F.cross_entropy(logits, t_chunk, reduction="sum")
            if want_h or want_w:
                # d(mean loss)/d(logits) = (softmax - one_hot(target)) / n
                g = torch.softmax(logits, dim=-1)
                g[torch.arange(g.size(0), device=g.device), t_chunk] -= 1.0
                g /= n
                if want_h:
                    grad_h[i:i + chunk_rows] = g @ weight
                if want_w:
                    grad_w += g.t() @ h_chunk
        ctx.save_for_backward(grad_h, grad_w)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_loss,
                None if grad_w is None else grad_w * grad_loss, None, None, None)


class GPT(nn.Module):
    def __init__(self, config, attention="sdpa", ce_chunk_rows=0):
        super().__init__()
        self.config = config
        self.ce_chunk_rows = ce_chunk_rows  # > 0: the loss through ChunkedCrossEntropy, no whole-batch logits
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, attention) for _ in range(config.n_layer)]),
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

    def hidden_states(self, idx, caches=None):
        """The final (B, T, n_embd) states, before lm_head; `caches` (one dict per layer) for generation."""
        B, T = idx.size()
        start = caches[0]["k"].size(2) if caches and "k" in caches[0] else 0  # tokens already in the cache
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches else None)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None):
        """(logits, loss); with ce_chunk_rows and targets, (None, loss): the logits are never made whole."""
        x = self.hidden_states(idx)
        if targets is not None and self.ce_chunk_rows:
            loss = ChunkedCrossEntropy.apply(x.view(-1, x.size(-1)), self.lm_head.weight, targets.view(-1),
                                             self.ce_chunk_rows, torch.is_grad_enabled())
            return None, loss
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True):
        """
        Sample `max_new_tokens` tokens after each row of `idx` (B, T); returns (B, T + max_new_tokens).
        With the KV cache the prompt is run once and then one token per step; past block_size
        (where the window must slide) every step runs the whole, cropped sequence instead.
        """
        use_cache = use_cache and idx.size(1) + max_new_tokens <= self.config.block_size
        caches = [{} for _ in self.transformer.h] if use_cache else None
        new = idx
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self.lm_head(self.hidden_states(new, caches)[:, -1, :])
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
        sd_hf = hf_weights(hf_model)
        if set(sd_hf) != set(sd):
            raise UserError(f"{name_or_path}: parameter names differ from GPT-2's: "
                            f"{sorted(set(sd_hf) ^ set(sd))[:4]}")
        with torch.no_grad():
            for k, v in sd_hf.items():
                sd[k].copy_(conv1d_transpose(k, v))
        return model

    def save_pretrained(self, out_dir, vocab_size=50257):
        """
        Write this model as a transformers GPT-2 directory (GPT2LMHeadModel.from_pretrained loads it),
        with the embedding cut back to the tokenizer's `vocab_size` and GPT-2's tokenizer files beside it.
        """
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = self.config
        if cfg.vocab_size < vocab_size:
            raise UserError(f"the model's vocabulary ({cfg.vocab_size}) is smaller than GPT-2's tokenizer's ({vocab_size})")
        hf_model = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256))
        sd = self.state_dict()
        with torch.no_grad():
            for k, v in hf_weights(hf_model).items():
                # the padding rows past the tokenizer's vocabulary are never used: drop them
                w = sd[k][:vocab_size] if k in ("transformer.wte.weight", "lm_head.weight") else sd[k]
                v.copy_(conv1d_transpose(k, w))
        hf_model.save_pretrained(out_dir)
        write_gpt2_tokenizer(out_dir, cfg.block_size)


def hf_weights(hf_model):
    """A transformers GPT-2's parameters by name, without its causal-mask buffers."""
    return {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.masked_bias", ".attn.bias"))}


def conv1d_transpose(name, tensor):
    """transformers' GPT-2 keeps these four weights as (in, out) (its Conv1D), nn.Linear as (out, in): the
    same transpose converts either way."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return tensor.t() if name.endswith(conv1d) else tensor


def write_gpt2_tokenizer(out_dir, max_length):
    """GPT-2's own tokenizer files (vocab.json = encoder.json, merges.txt = vocab.bpe), as tiktoken fetches
    and caches them, so an exported model loads with its tokenizer offline, e.g. in lm-evaluation-harness."""
    from tiktoken.load import read_file_cached

    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    files = {"vocab.json": ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
             "merges.txt": ("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5")}
    try:
        for name, (remote, sha256) in files.items():
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(read_file_cached(base + remote, sha256))
    except Exception as e:  # tiktoken raises plain network or hash errors
        raise UserError(f"could not get GPT-2's tokenizer files ({type(e).__name__}); connect once, or set "
                        "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache") from None
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "add_prefix_space": False,
              "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# -----------------------------------------------------------------------------
# Data: token shards written by fineweb.py: build-nanogpt's uint16 .npy, or llm.c's .bin

EOT = 50256  # <|endoftext|>: fineweb.py puts one before every document


def list_shards(data_root, split):
    """The shard files of one split, sorted by name, as build-nanogpt's loader orders them."""
    if not os.path.isdir(data_root):
        raise UserError(f"data directory {data_root!r} does not exist; run `python fineweb.py` to make it, "
                        "or point --data_dir at your shards")
    shards = sorted(glob.glob(os.path.join(data_root, f"*_{split}_*.npy")) +
                    glob.glob(os.path.join(data_root, f"*_{split}_*.bin")))
    if not shards:
        raise UserError(f"no {split} shards (*_{split}_*.npy or .bin) in {data_root!r}; run `python fineweb.py`, "
                        "or point --data_dir at your shards")
    return shards


def load_tokens(path, vocab_size=None):
    """
    Memory-map one shard: only the slices a batch touches are read from disk. With vocab_size, also
    check every token id (a full read of the shard, done when training reaches it).
    """
    fix = "delete it and rerun `python fineweb.py`"
    if path.endswith(".bin"):  # llm.c: 256 int32 (magic, version, token count, ...), then uint16 tokens
        header = np.fromfile(path, dtype=np.int32, count=256)
        if len(header) < 256 or header[0] != BIN_MAGIC:
            raise UserError(f"shard {path} is not an llm.c data file (no magic number {BIN_MAGIC}); {fix}")
        if header[1] != BIN_VERSION:
            raise UserError(f"shard {path} is llm.c data version {header[1]}, only {BIN_VERSION} (uint16) is read")
        size, expected = os.path.getsize(path), 256 * 4 + 2 * int(header[2])
        if size != expected:
            raise UserError(f"shard {path} has {size:,} bytes, its header promises {expected:,}: truncated? {fix}")
        tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=256 * 4, shape=(int(header[2]),))
    else:
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"shard {path} is unreadable ({e}); {fix}") from None
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise UserError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, expected a 1-D uint16 "
                            "array as fineweb.py writes")
    if vocab_size is not None and len(tokens) and (top := int(tokens.max())) >= vocab_size:
        raise UserError(f"shard {path} holds token id {top}, beyond the model's vocabulary of {vocab_size}: "
                        f"not GPT-2 tokens? {fix}")
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
        self.tokens = load_tokens(self.shards[self.current_shard], self.vocab_size)
        if self.shuffle:
            self.tokens = shuffle_documents(self.tokens, np.random.default_rng([self.seed, self.epoch,
                                                                                self.current_shard]))

    def next_batch(self):
        B, T = self.B, self.T
        start = self.current_position + B * T * self.process_rank
        buf = torch.from_numpy(self.tokens[start: start + B * T + 1].astype(np.int64))
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


class SyntheticLoader:
    """Random tokens in place of shards, for measuring speed with no data on disk (--synthetic)."""

    def __init__(self, B, T, process_rank, num_processes, split, seed=0):
        self.B, self.T, self.num_processes = B, T, num_processes
        self.shards, self.skipped = [], []
        self.seed = 2 * (seed * 1000 + process_rank) + (split == "val")  # its own stream per rank and split
        self.reset()

    def reset(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def next_batch(self):
        buf = torch.randint(0, 50257, (self.B * self.T + 1,), generator=self.generator)
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


class DevicePrefetcher:
    """
    A loader's batches on the device, one batch ahead: while the device works on batch i, batch i+1 is
    already sliced and (on CUDA, from pinned memory, without blocking) on its way. The position it
    reports is the loader's before the batch it holds, so a checkpoint resumes with that batch.
    """

    def __init__(self, loader, device, prefetch=True):
        self.loader, self.device, self.prefetch = loader, device, prefetch
        self.pinned = device.startswith("cuda")
        self._refill()

    def _refill(self):
        """Drop the batch in hand (the loader has moved) and, prefetching, take the next one."""
        self._pending = None
        if self.prefetch:
            self._fetch()

    def _fetch(self):
        self._state = self.loader.state_dict()
        x, y = self.loader.next_batch()
        if self.pinned:  # a copy from pinned memory can run while the host goes on
            x, y = x.pin_memory(), y.pin_memory()
        self._pending = (x.to(self.device, non_blocking=self.pinned), y.to(self.device, non_blocking=self.pinned))

    def next_batch(self):
        if self._pending is None:  # not prefetching: fetch on demand
            self._fetch()
        batch = self._pending
        self._refill()
        return batch

    def reset(self):
        self.loader.reset()
        self._refill()

    def state_dict(self):
        return self._state if self._pending is not None else self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)
        self._refill()


# -----------------------------------------------------------------------------
# Optimizer and learning-rate schedule


def configure_optimizers(model, weight_decay, learning_rate, device_type, fused=None):
    """AdamW with decay on matrices (matmul weights, embeddings) only; biases and LayerNorm gains are left alone."""
    params = [p for p in model.parameters() if p.requires_grad]
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


def sample_text(model, enc, prompt, num_samples, max_new_tokens, device, seed, temperature=1.0, top_k=50):
    """`num_samples` continuations of `prompt`, decoded; the same seed gives the same texts."""
    tokens = torch.tensor(enc.encode(prompt), dtype=torch.long, device=device)
    idx = tokens.unsqueeze(0).repeat(num_samples, 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    # a barely trained model can pick one of the padding ids past the tokenizer's vocabulary
    return [enc.decode([t for t in row.tolist() if t < enc.n_vocab]) for row in out]


# -----------------------------------------------------------------------------
# Checkpoints: everything the next step depends on, so a resumed run continues exactly
#
# model_{step}.pt are the milestones (every --checkpoint_every steps, kept); ckpt_{step}.pt the
# frequent resume points (--save_every, --save_every_minutes, a stop signal), rotated by --keep_last.
# Both hold the full state of the run at the top of `step`, after `step` updates.

CHECKPOINT_RE = re.compile(r"^(model|ckpt)_(\d+)\.pt$")


def atomic_torch_save(obj, path):
    """Write to a temporary name, fsync, then rename: a crash leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write checkpoint {path} ({e.strerror or e}); the earlier checkpoints are "
                        "intact: free some space, then rerun the same command to resume") from None


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, keys.tolist(), pos, has_gauss, gauss)  # lists, not arrays: weights_only loads them
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, model, optimizer, step, val_loss, args, train_loader, val_loader, world_size):
    atomic_torch_save({
        "model": model.state_dict(),  # the plain module: no "_orig_mod." or "module." prefixes
        "optimizer": optimizer.state_dict(),
        "config": asdict(model.config),
        "step": step,
        "val_loss": val_loss,
        "args": vars(args),
        "world_size": world_size,
        "data": {"train": train_loader.state_dict(), "val": val_loader.state_dict()},
        "rng": rng_state(),
    }, path)


def load_checkpoint(path, device="cpu"):
    """torch.load with weights_only=True, and a clear error for a missing, truncated or foreign file."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise UserError(f"{path} is not a readable train_gpt2.py checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "step"} <= set(ckpt):
        raise UserError(f"{path} is not a train_gpt2.py checkpoint (no model, config and step in it)")
    return ckpt


def load_model_checkpoint(path, device="cpu"):
    """Rebuild a GPT from a checkpoint file written by save_checkpoint."""
    ckpt = load_checkpoint(path, device)
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError) as e:
        raise UserError(f"{path}: the weights do not fit its config ({first_line(e)})") from None
    return model.to(device)


def list_checkpoints(log_dir):
    """(step, path) of every checkpoint in log_dir, newest first."""
    found = []
    for name in os.listdir(log_dir) if os.path.isdir(log_dir) else []:
        m = CHECKPOINT_RE.match(name)
        if m:
            found.append((int(m.group(2)), os.path.join(log_dir, name)))
    return sorted(found, reverse=True)


def find_resume_checkpoint(args, device):
    """The checkpoint to continue from (loaded), or None to start fresh, per --resume."""
    if args.resume == "none" or args.overwrite:
        return None
    if args.resume != "auto":
        return dict(load_checkpoint(args.resume, device), path=args.resume)
    candidates = list_checkpoints(args.log_dir)
    for _, path in candidates:
        try:
            ckpt = load_checkpoint(path, device)
        except UserError as e:
            print(f"warning: skipping {e}")  # a truncated newest file: fall back to the one before
            continue
        return dict(ckpt, path=path)
    if candidates:
        raise UserError(f"no readable checkpoint among the {len(candidates)} in {args.log_dir}; "
                        "pass --resume none --overwrite to start over, or --resume PATH")
    return None


def check_resumable(ckpt, config, args, world_size):
    """Refuse a checkpoint of another model or token stream; report the changes that are allowed."""
    if not {"optimizer", "data", "rng", "args", "world_size"} <= set(ckpt):
        raise UserError(f"{ckpt.get('path', 'the checkpoint')} holds weights only, not a run's full state; "
                        "it cannot be resumed (use --resume none)")
    saved = ckpt["args"]
    if ckpt["config"] != asdict(config):
        diff = ", ".join(f"{k} {v} (this run: {getattr(config, k)})" for k, v in ckpt["config"].items()
                         if getattr(config, k) != v)
        raise UserError(f"the checkpoint is of another model: {diff}; pass the checkpoint's model flags, "
                        "or --log_dir NEW to start a new run")
    for flag in ("seq_len", "total_batch_size", "shuffle"):
        if saved.get(flag, False) != getattr(args, flag):
            raise UserError(f"the checkpoint was trained with --{flag} {saved[flag]}, this run has "
                            f"{getattr(args, flag)}: the batches would change; pass --{flag} {saved[flag]}")
    notes = []
    if saved["batch_size"] != args.batch_size or ckpt["world_size"] != world_size:
        notes.append(f"-B {saved['batch_size']} x {ckpt['world_size']} processes -> -B {args.batch_size} x "
                     f"{world_size} processes: the same total batch, the token stream continues where it stopped")
    for flag in ("max_steps", "warmup_steps", "max_lr", "min_lr_ratio", "weight_decay", "grad_clip"):
        if saved[flag] != getattr(args, flag):
            notes.append(f"--{flag} changed from {saved[flag]} to {getattr(args, flag)}")
    return notes


def truncate_log(log_file, step):
    """Keep only the lines of steps before `step`: the resumed run writes the rest again."""
    if not os.path.exists(log_file):
        return
    with open(log_file) as f:
        kept = [line for line in f if line.split(maxsplit=1)[0].isdigit() and int(line.split()[0]) < step]
    tmp = f"{log_file}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, log_file)


def rotate_checkpoints(log_dir, keep_last, step):
    """Keep the newest keep_last resume points up to `step`; milestones stay. Files past `step` (left by
    an abandoned or unreadable later save) are not counted: the run overwrites them when it gets there."""
    resume_points = [path for s, path in list_checkpoints(log_dir)
                     if s <= step and os.path.basename(path).startswith("ckpt_")]
    for path in resume_points[keep_last:]:
        os.remove(path)


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


COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# --sdpa_backend: which torch.backends.cuda switch each choice leaves on (CPU kernels obey flash and math too)
SDPA_BACKENDS = {"auto": None, "flash": "flash", "cudnn": "cudnn", "efficient": "mem_efficient", "math": "math"}


def select_sdpa_backend(name, device_type):
    """Leave only the chosen kernel enabled for F.scaled_dot_product_attention (auto: torch picks per call)."""
    if SDPA_BACKENDS[name] is None:
        return
    if device_type != "cuda" and name not in ("flash", "math"):
        raise UserError(f"--sdpa_backend {name} needs a CUDA GPU; on {device_type} use auto, flash or math")
    for backend in ("flash", "mem_efficient", "math", "cudnn"):
        getattr(torch.backends.cuda, f"enable_{backend}_sdp")(backend == SDPA_BACKENDS[name])


def micro_batch_candidates(total_batch_size, T, world_size):
    """The micro-batch sizes that divide one process's share of the total batch, largest first."""
    per_process = total_batch_size // (T * world_size)
    return [b for b in range(per_process, 0, -1) if total_batch_size % (b * T * world_size) == 0]


def out_of_memory(e):
    """The device refused an allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e)


def largest_micro_batch(model, candidates, T, vocab_size, autocast_ctx, device, reserve_bytes):
    """
    -B auto: the first of `candidates` (largest first) for which a forward and backward pass of
    `model` (compiled, if it is: the memory of the graph that will run) fits on the device next to
    `reserve_bytes` held back for what training adds later (AdamW's moments, DDP's buckets).
    Every candidate that does not fit costs one pass (and, compiled, one compilation).
    """
    device_type = device.split(":")[0]
    generator = torch.Generator(device=device).manual_seed(0)  # the global RNG stays untouched
    reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
    try:
        for B in candidates:
            try:
                x = torch.randint(0, vocab_size, (B, T), device=device, generator=generator)
                with autocast_ctx:
                    _, loss = model(x, x)
                loss.backward()
                synchronize(device_type)
                return B
            except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                if not out_of_memory(e):
                    raise
            finally:
                x = loss = None
                model.zero_grad(set_to_none=True)
                if device_type == "cuda":
                    torch.cuda.empty_cache()
        raise UserError(f"not even -B {candidates[-1]} fits in {device_type} memory; use a smaller model or -T")
    finally:
        del reserve
        if device_type == "cuda":
            torch.cuda.empty_cache()


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


def micro_batch_size(value):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train GPT-2 from scratch; the defaults are the GPT-2 124M recipe.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_dir", default="edu_fineweb10B",
                   help="folder of *_train_* / *_val_* shards, .npy (build-nanogpt) or .bin (llm.c)")
    g.add_argument("--log_dir", default="log", help="log.txt and model_*.pt go here")
    g.add_argument("--overwrite", action="store_true", help="start over in a --log_dir that already holds a run")
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
    g.add_argument("--max_lr", type=float, default=6e-4, help="peak learning rate (GPT-3 Small's)")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="min_lr = max_lr * this")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay of the 2-D tensors only")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm to this")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval_every", type=int, default=250, help="val loss, HellaSwag and samples every N steps")
    g.add_argument("--val_steps", type=int, default=20, help="val batches per evaluation, per process")
    g.add_argument("--hellaswag", action=argparse.BooleanOptionalAction, default=True,
                   help="HellaSwag acc_norm at every evaluation, split across processes")
    g.add_argument("--hellaswag_limit", type=int, default=None, help="score only the first N val examples")
    g.add_argument("--hellaswag_batch_tokens", type=int, default=8192,
                   help="HellaSwag tokens per forward pass (0: one example at a time, build-nanogpt's way)")
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
    g.add_argument("--save_every_minutes", type=float, default=0, help="also every M minutes (0: off)")
    g.add_argument("--keep_last", type=int, default=2, help="how many ckpt_*.pt to keep (milestones always stay)")
    g = p.add_argument_group("model")
    g.add_argument("--n_layer", type=int, default=12, help="transformer blocks")
    g.add_argument("--n_head", type=int, default=12, help="attention heads")
    g.add_argument("--n_embd", type=int, default=768, help="width of the residual stream")
    g.add_argument("--block_size", type=int, default=1024, help="longest context (positions learned)")
    g.add_argument("--vocab_size", type=int, default=50304, help="50257 padded to a multiple of 128 for speed")
    g = p.add_argument_group("system")
    g.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                   help="autocast dtype (default: bf16 on CUDA GPUs that support it, else fp32)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    g.add_argument("--compile_mode", default="default", choices=COMPILE_MODES, help="torch.compile's mode")
    g.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU, if not in the table")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    g.add_argument("--fused_adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="the fused AdamW kernel (default: on for CUDA)")
    g.add_argument("--attention", choices=["sdpa", "manual"], default="sdpa",
                   help="sdpa: flash attention; manual: the (T, T) matrix written out (same math)")
    g.add_argument("--sdpa_backend", choices=list(SDPA_BACKENDS), default="auto",
                   help="the kernel behind scaled_dot_product_attention (auto: torch's choice; cudnn, efficient: "
                        "CUDA only)")
    g.add_argument("--chunked_ce", type=int, default=0, metavar="ROWS",
                   help="lm_head + loss ROWS rows at a time, never the whole batch's logits (0: off; same math)")
    g.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="load the next batch (pinned, non-blocking on CUDA) while the device works")
    g = p.add_argument_group("benchmarking")
    g.add_argument("--synthetic", action="store_true", help="random tokens instead of --data_dir's shards")
    g.add_argument("--benchmark", action="store_true",
                   help="measure speed: --synthetic data, no evaluation, log or checkpoints; --max_steps steps, "
                        "then one summary line (median ms/step after warm-up, tok/s, MFU, peak memory)")
    g.add_argument("--seed", type=int, default=1337, help="model init and --shuffle")
    args = p.parse_args(argv)

    positive = ["seq_len", "total_batch_size", "max_steps", "warmup_steps", "eval_every",
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
    if args.max_lr <= 0 or not 0 <= args.min_lr_ratio <= 1:
        p.error("--max_lr must be positive and --min_lr_ratio within [0, 1]")
    if args.hellaswag_limit is not None and args.hellaswag_limit <= 0:
        p.error("--hellaswag_limit must be positive")
    if args.hellaswag_batch_tokens < 0:
        p.error("--hellaswag_batch_tokens must be >= 0")
    if args.save_every < 0 or args.save_every_minutes < 0 or args.keep_last < 1:
        p.error("--save_every and --save_every_minutes must be >= 0, --keep_last >= 1")
    if args.benchmark:  # speed only: nothing read from or written to disk, nothing but training steps
        args.synthetic, args.hellaswag, args.sample, args.resume = True, False, False, "none"
    return args


def prepare_log_dir(args, resume_step):
    """
    Resuming: keep the log up to resume_step. Starting fresh: never replace an earlier run's
    checkpoints or log by accident (with --resume auto, a log whose run left no checkpoint is redone).
    """
    os.makedirs(args.log_dir, exist_ok=True)
    for name in os.listdir(args.log_dir):
        if name.endswith(".tmp"):  # a save or log rewrite that a crash cut short
            os.remove(os.path.join(args.log_dir, name))
    log_file = os.path.join(args.log_dir, "log.txt")
    if resume_step is not None:
        truncate_log(log_file, resume_step)
        return log_file
    previous = [path for _, path in list_checkpoints(args.log_dir)]
    if os.path.exists(log_file):
        previous.insert(0, log_file)
    if previous and args.resume == "none" and not args.overwrite:
        names = ", ".join(os.path.basename(f) for f in previous[:3]) + (" ..." if len(previous) > 3 else "")
        raise UserError(f"{args.log_dir} already holds a run ({names}); drop --resume none to continue it, "
                        "pass --log_dir NEW_DIR, or --overwrite to delete it and start over")
    for f in previous:
        os.remove(f)
    open(log_file, "w").close()
    return log_file


# -----------------------------------------------------------------------------
# Training loop


def train(args, stop_signals):
    """The run; returns the exit code. A signal appended to stop_signals ends it at the next step, saved."""
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

    select_sdpa_backend(args.sdpa_backend, device_type)

    T = args.seq_len
    if args.batch_size == "auto":
        if device_type != "cuda":
            raise UserError(f"-B auto measures GPU memory, and this run is on {device_type}; pass a number, e.g. -B 8")
        candidates = micro_batch_candidates(args.total_batch_size, T, ddp_world_size)
        if not candidates:
            raise UserError(f"--total_batch_size {args.total_batch_size} is not a multiple of T*processes = "
                            f"{T}*{ddp_world_size}; change -T or --total_batch_size")
    else:
        candidates = [args.batch_size]
        if args.total_batch_size % (args.batch_size * T * ddp_world_size) != 0:
            raise UserError(f"--total_batch_size {args.total_batch_size} is not a multiple of B*T*processes = "
                            f"{args.batch_size}*{T}*{ddp_world_size} = {args.batch_size * T * ddp_world_size}; "
                            "change -B, -T or --total_batch_size")

    def make_loaders(B):
        if args.synthetic:
            return (SyntheticLoader(B, T, ddp_rank, ddp_world_size, "train", args.seed),
                    SyntheticLoader(B, T, ddp_rank, ddp_world_size, "val", args.seed))
        return (DataLoaderLite(B, T, ddp_rank, ddp_world_size, "train", args.data_dir, args.vocab_size,
                               shuffle=args.shuffle, seed=args.seed),
                DataLoaderLite(B, T, ddp_rank, ddp_world_size, "val", args.data_dir, args.vocab_size))

    # check everything the user supplied before the (slow) process group and model start; with -B auto,
    # at the smallest candidate, and made again once the micro-batch is known
    train_loader, val_loader = make_loaders(candidates[-1])
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
    config = GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size,
                       n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    ckpt = find_resume_checkpoint(args, "cpu")
    notes = check_resumable(ckpt, config, args, ddp_world_size) if ckpt else []
    start_step = ckpt["step"] if ckpt else 0
    resumed_from = ckpt["path"] if ckpt else None
    log_file = prepare_log_dir(args, start_step if ckpt else None) if master_process and not args.benchmark else None

    if ddp:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        steps = torch.tensor([start_step, -start_step], dtype=torch.float32, device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0].item() != -steps[1].item():
            raise UserError(f"the ranks found different checkpoints (steps {-steps[1].item():.0f} to "
                            f"{steps[0].item():.0f}): --log_dir must be storage that every node shares")
    torch.manual_seed(args.seed)
    if device_type == "cuda":
        torch.cuda.manual_seed(args.seed)
        # TF32 matmuls (10-bit mantissa inputs, fp32 accumulation); CPU matmuls stay full fp32
        torch.set_float32_matmul_precision("high" if args.tf32 else "highest")

    # the plain module: evaluated, sampled and saved
    raw_model = GPT(config, args.attention, ce_chunk_rows=args.chunked_ce).to(device)
    optimizer = configure_optimizers(raw_model, args.weight_decay, args.max_lr, device_type, args.fused_adamw)
    model = torch.compile(raw_model, mode=args.compile_mode) if use_compile else raw_model
    if args.batch_size == "auto":
        # held back for AdamW's two moments, and DDP's gradient buckets, which come after the probe
        param_bytes = sum(p.numel() * p.element_size() for p in raw_model.parameters())
        B = largest_micro_batch(model, candidates, T, config.vocab_size, autocast_ctx, device,
                                (2 + ddp) * param_bytes)
        if ddp:  # every rank must take the same micro-batch: the smallest any of them found
            found = torch.tensor(B, device=device)
            dist.all_reduce(found, op=dist.ReduceOp.MIN)
            B = int(found.item())
        args.batch_size = B  # what checkpoints record
        train_loader, val_loader = make_loaders(B)
    B = args.batch_size
    grad_accum_steps = args.total_batch_size // (B * T * ddp_world_size)
    # the loop reads batches through these: on the device, the next one already on its way
    train_batches = DevicePrefetcher(train_loader, device, args.prefetch)
    val_batches = DevicePrefetcher(val_loader, device, args.prefetch)
    val_loss = None
    if ckpt:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])  # moves the moments to the parameters' device
        train_batches.load_state_dict(ckpt["data"]["train"])
        val_batches.load_state_dict(ckpt["data"]["val"])
        set_rng_state(ckpt["rng"])
        val_loss = ckpt["val_loss"]
        del ckpt  # the CPU copy of the weights and moments is no longer needed
    if ddp:
        model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)
    # HellaSwag batches vary in shape: a compiled graph of its own, with dynamic shapes, on the same weights
    hella_model = hellaswag.Model(torch.compile(raw_model.hidden_states, dynamic=True) if use_compile
                                  else raw_model.hidden_states, raw_model.lm_head, config.block_size)

    flops_per_token = raw_model.flops_per_token(T)
    peak_flops = device_peak_flops(device_type, args.peak_tflops)
    if master_process:
        n_decay = sum(p.numel() for p in optimizer.param_groups[0]["params"])
        n_nodecay = sum(p.numel() for p in optimizer.param_groups[1]["params"])
        print(f"device {device} | dtype {dtype} | compile {use_compile}"
              + (f" ({args.compile_mode})" if use_compile else "") + f" | processes {ddp_world_size} | attention "
              f"{args.attention} ({args.sdpa_backend}) | fused AdamW {optimizer.defaults.get('fused') or False} | "
              f"chunked CE {args.chunked_ce or 'off'} | prefetch {args.prefetch}")
        print(f"model: {raw_model.num_params(non_embedding=False):,} parameters "
              f"({n_decay:,} decayed, {n_nodecay:,} not)")
        print(f"total batch {args.total_batch_size:,} tokens = {B} x {T} x {ddp_world_size} processes "
              f"x {grad_accum_steps} accumulation steps")
        print("data: random tokens (--synthetic)" if args.synthetic else
              f"train shards {len(train_loader.shards)}, val shards {len(val_loader.shards)} in {args.data_dir}")
        for path in train_loader.skipped + val_loader.skipped:
            print(f"note: skipping {path}: shorter than one batch of {B}x{T}x{ddp_world_size}+1 tokens")
        if peak_flops is None:
            print("MFU not shown: peak FLOP/s of this device unknown (pass --peak_tflops)")
        if resumed_from:
            print(f"resuming at step {start_step} from {resumed_from}")
        for note in notes:
            print(f"note: {note}")

    def log(line):
        if log_file:
            with open(log_file, "a") as f:
                f.write(line + "\n")

    def save(name, step):
        path = os.path.join(args.log_dir, f"{name}_{step:05d}.pt")
        save_checkpoint(path, raw_model, optimizer, step, val_loss, args, train_batches, val_batches, ddp_world_size)
        print(f"saved {path}")
        return path

    step_times = []
    last_save = time.time()
    stop = timed = False  # a stop signal, a timed save: requested during the step before, agreed by all ranks
    for step in range(start_step, args.max_steps):
        last_step = step == args.max_steps - 1
        milestone = step > 0 and (step % args.checkpoint_every == 0 or last_step)  # model_{step}.pt, kept

        # --- resume points: every rank takes the same decision, so all stop at the same step
        if step > start_step:
            periodic = args.save_every > 0 and step % args.save_every == 0
            path = None
            if master_process and not args.benchmark and (stop or ((periodic or timed) and not milestone)):
                path = save("ckpt", step)
                rotate_checkpoints(args.log_dir, args.keep_last, step)
                last_save = time.time()
            if stop:
                if ddp:
                    dist.barrier()  # the checkpoint is complete before any rank exits
                signum = stop_signals[0] if stop_signals else signal.SIGTERM
                print(f"rank {ddp_rank}: stopped at step {step} on {signal.Signals(signum).name}"
                      + (f", saved {path}" if path else "") + "; run the same command again to resume", flush=True)
                if ddp:
                    dist.destroy_process_group()
                return 128 + signum  # non-zero, so a restart loop runs it again

        # --- evaluate: at step 0, every eval_every steps and at the last step (before its update)
        if not args.benchmark and (step % args.eval_every == 0 or last_step):
            model.eval()
            val_loss_t = estimate_val_loss(model, val_batches, args.val_steps, device, autocast_ctx)
            if ddp:
                dist.all_reduce(val_loss_t, op=dist.ReduceOp.AVG)
            val_loss = val_loss_t.item()
            if master_process:
                print(f"validation loss: {val_loss:.4f}")
                log(f"{step} val {val_loss:.4f}")
            if args.hellaswag:
                result = hellaswag.evaluate(hella_model, device, rank=ddp_rank, world_size=ddp_world_size,
                                            limit=args.hellaswag_limit, batch_tokens=args.hellaswag_batch_tokens,
                                            autocast_ctx=autocast_ctx)
                counts = torch.tensor([result.correct_norm, result.total], dtype=torch.long, device=device)
                if ddp:
                    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
                acc_norm = counts[0].item() / counts[1].item()
                if master_process:
                    print(f"HellaSwag accuracy: {counts[0].item()}/{counts[1].item()}={acc_norm:.4f}")
                    log(f"{step} hella {acc_norm:.4f}")
            if args.sample and master_process and step > 0:
                prompt = "Hello, I'm a language model,"  # build-nanogpt's: 8 tokens, 32 in all
                with autocast_ctx:
                    samples = sample_text(raw_model, enc, prompt, 4, 32 - len(enc.encode(prompt)), device, seed=42)
                for i, text in enumerate(samples):
                    print(f"sample {i}: {text}")
            model.train()

        if master_process and not args.benchmark and milestone:
            save("model", step)
            last_save = time.time()

        # --- one optimizer step over grad_accum_steps micro-batches
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=device)
        for micro_step in range(grad_accum_steps):
            x, y = train_batches.next_batch()
            # DDP all-reduces gradients only on the last micro-step; the others just accumulate locally
            sync = not ddp or micro_step == grad_accum_steps - 1
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with autocast_ctx:
                    _, loss = model(x, y)
                # mean over the whole batch, not over each micro-batch: scale before summing gradients
                loss = loss / grad_accum_steps
                loss_accum += loss.detach()
                loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
        lr = get_lr(step, args)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        optimizer.step()
        # the step's one host sync is the log line; under DDP one all-reduce, just before it, carries the
        # loss and every rank's stop and save requests, so all ranks act on them at the top of the next step
        stop = len(stop_signals) > 0
        timed = master_process and 0 < args.save_every_minutes * 60 <= time.time() - last_save
        if ddp:
            shared = torch.zeros(3, device=device)  # filled on the device: no host-to-device copy to wait on
            shared[0] = loss_accum / ddp_world_size
            if stop:
                shared[1] = 1.0
            if timed:
                shared[2] = 1.0
            dist.all_reduce(shared, op=dist.ReduceOp.SUM)
            loss_value, stop, timed = shared.tolist()
        else:
            loss_value = loss_accum.item()
        synchronize(device_type)
        dt = time.time() - t0
        step_times.append(dt)
        if master_process:
            tokens_per_sec = args.total_batch_size / dt
            mfu = "" if peak_flops is None else \
                f" | mfu {100 * flops_per_token * tokens_per_sec / (peak_flops * ddp_world_size):.2f}%"
            print(f"step {step:5d} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm.item():.4f} | "
                  f"dt {dt * 1000:.2f}ms | tok/sec {tokens_per_sec:.2f}{mfu}")
            log(f"{step} train {loss_value:.6f}")

    if master_process and args.benchmark:
        print_benchmark(args, step_times, flops_per_token, peak_flops, ddp_world_size, device_type)
    if ddp:
        dist.barrier()  # tear down together: no rank closes its connections while another still uses them
        dist.destroy_process_group()
    return 0


def print_benchmark(args, step_times, flops_per_token, peak_flops, world_size, device_type):
    """The median step after warm-up (the first fifth of the steps, at least one: compilation, allocator)."""
    warmup = max(1, len(step_times) // 5)
    measured = sorted(step_times[warmup:] or step_times)
    ms = 1000 * measured[len(measured) // 2]
    tokens_per_sec = args.total_batch_size / (ms / 1000)
    mfu = 100 * flops_per_token * tokens_per_sec / (peak_flops * world_size) if peak_flops else None
    if device_type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated() / 2 ** 30
    else:  # the process's peak resident memory (Linux reports KiB, macOS bytes)
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_memory = rss / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)
    result = dict(ms_per_step=round(ms, 2), tokens_per_sec=round(tokens_per_sec), mfu=mfu and round(mfu, 2),
                  peak_memory_gib=round(peak_memory, 2), steps_measured=len(measured), warmup_steps=warmup)
    print(f"benchmark: median {ms:.2f} ms/step over {len(measured)} steps after {warmup} warm-up | "
          f"{tokens_per_sec:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{mfu:.2f}%'} | "
          f"peak {'GPU' if device_type == 'cuda' else 'process'} memory {peak_memory:.2f} GiB")
    print("BENCHMARK " + json.dumps(result))  # for benchmarks/ladder.py


def main(argv=None):
    args = parse_args(argv)
    # SIGTERM (preemption, torchrun shutting down) or Ctrl-C: finish the step, save, exit
    stop_signals = []

    def request_stop(signum, frame):
        stop_signals.append(signum)
        # a second one of the same kind ends the run at once, the default way
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = train(args, stop_signals)
    except UserError as e:
        sys.exit(f"train_gpt2.py: error: {e}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.exit(code)


if __name__ == "__main__":
    main()
