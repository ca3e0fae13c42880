"""
Beyond GPT-2's recipe, opt-in by flag: the parts of the Llama-style model and of the modded-nanogpt
speedrun's recipe. train_gpt2.py's GPT builds its blocks from here when --arch is not gpt2, and its
training loop takes Muon and the warmup-stable-decay schedule from here; GPT-2's own classes stay as
the lecture has them.

    llama   RoPE, RMSNorm with a weight, a SwiGLU MLP (8/3 n_embd, rounded up to 64), no biases
    modern  RoPE, RMSNorm without weights, QK-norm, a ReLU^2 MLP, zero-initialised output projections
            (the speedrun's record of 2024-10-14, "ModernArch"; its untied, zero head with --untie_head)
    simple  modern's blocks with RMSNorm gains and the speedrun's plain-PyTorch reference init (embedding
            N(0, 1), matrices N(0, 0.33 / fan_in), projections zero); with --recipe speedrun-simple also
            biases, half-truncated rotary, attention scale 0.12, an embedding norm and soft-capped logits

Neither has learned positions: rotary embeddings turn each query and key by an angle that grows with
its position, so attention scores depend on how far apart two tokens are.
"""

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from machinery.common import UserError

ARCHS = ("gpt2", "llama", "modern", "simple")
ROPE_THETA = 10000.0
RMS_EPS = 1e-6  # LlamaConfig's rms_norm_eps, so that an export computes the same function
# the speedrun's later records warm Muon's momentum up from 0.85 to 0.95 (over --muon_momentum_warmup steps)
MUON_MOMENTUM = (0.85, 0.95)


# -----------------------------------------------------------------------------
# The blocks


def norm_eps(config):
    """simple: F.rms_norm's own epsilon (the dtype's), as the reference; llama and modern: Llama's."""
    return None if config.arch == "simple" else RMS_EPS


class RMSNorm(nn.Module):
    """x / rms(x), times a learned gain (llama, simple) or not (modern): no mean subtracted, no bias."""

    def __init__(self, n_embd, weight, eps=RMS_EPS):
        super().__init__()
        self.n_embd, self.eps = n_embd, eps
        self.weight = nn.Parameter(torch.ones(n_embd)) if weight else None

    def forward(self, x):
        return F.rms_norm(x, (self.n_embd,), self.weight, self.eps)


def rotary_tables(head_size, block_size, variant="full"):
    """
    cos and sin, (block_size, hs): position t turns the pair of channels (i, i + hs/2) by t * freq_i.
    full: freq_i = theta^(-2i/hs), Llama's. half (the speedrun's): hs/4 frequencies from 1 down to 1/1024, and
    the other hs/4 pairs do not turn; turned the other way round, as the reference writes its rotation.
    """
    cpu = dict(dtype=torch.float32, device="cpu")  # computed on the CPU, even for a model made on the meta device
    if variant == "half":
        turning = (1 / 1024) ** torch.linspace(0, 1, steps=head_size // 4, **cpu)
        inv_freq = torch.cat((turning, torch.zeros(head_size // 2 - head_size // 4, **cpu)))
    else:
        inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, head_size, 2, **cpu) / head_size))
    angles = torch.outer(torch.arange(block_size, **cpu), inv_freq)  # (block_size, hs/2)
    angles = torch.cat((angles, angles), dim=-1)  # the half-split layout transformers' Llama uses
    return angles.cos(), angles.sin() if variant != "half" else -angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate (B, nh, T, hs) queries or keys at the positions of cos and sin (T, hs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # transformers' rotate_half
    return (x * cos + rotated * sin).type_as(x)


class RotaryAttention(nn.Module):
    """Causal self-attention with rotary positions and (modern) RMS-normed queries and keys."""

    def __init__(self, config, attend):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise UserError(f"n_embd ({config.n_embd}) must be a multiple of n_head ({config.n_head})")
        C, bias = config.n_embd, config.bias
        if config.rotary == "half" and (C // config.n_head) % 4:
            raise UserError(f"--rotary half needs a head size (n_embd / n_head = {C // config.n_head}) divisible by 4")
        # q, k and v apart: Muon orthogonalises each matrix on its own, and Llama keeps them apart too
        self.c_q, self.c_k, self.c_v = (nn.Linear(C, C, bias=bias) for _ in range(3))
        self.c_proj = nn.Linear(C, C, bias=bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.c_proj.ZERO_INIT = config.arch in ("modern", "simple")
        self.n_head, self.qk_norm, self.eps = config.n_head, config.arch in ("modern", "simple"), norm_eps(config)
        self.attend, self.attention = attend, config.attention  # train_gpt2's causal_attention: one for all archs
        self.scale = config.attn_scale or None  # None: 1/sqrt(hs)
        cos, sin = rotary_tables(C // config.n_head, config.block_size, config.rotary)
        self.register_buffer("cos", cos, persistent=False)  # computed, never saved
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        hs = C // self.n_head
        q = self.c_q(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.c_k(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.c_v(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:  # bounds the attention logits, which lets Muon's larger steps through
            q, k = F.rms_norm(q, (hs,), eps=self.eps), F.rms_norm(k, (hs,), eps=self.eps)
        start = cache["k"].size(2) if cache else 0  # generation: the new tokens come after the cached ones
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = self.attend(q, k, v, cache, self.attention, self.scale)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def swiglu_hidden(n_embd):
    """Llama's MLP width: 2/3 of 4 * n_embd (three matrices instead of two), rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * n_embd / 3 / 64)


class SwiGLU(nn.Module):
    """Llama's MLP: silu(x W_gate) * (x W_up), projected back."""

    def __init__(self, config):
        super().__init__()
        hidden = swiglu_hidden(config.n_embd)
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x):
        return self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x))


class ReLU2MLP(nn.Module):
    """The speedrun's MLP: relu(x W)^2, 4 * n_embd wide; the output projection starts at zero."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.ZERO_INIT = True

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Pre-norm, like GPT-2's, with RMSNorm and the arch's attention and MLP."""

    def __init__(self, config, attend):
        super().__init__()
        gain = config.arch in ("llama", "simple")
        self.ln_1 = RMSNorm(config.n_embd, gain, norm_eps(config))
        self.attn = RotaryAttention(config, attend)
        self.ln_2 = RMSNorm(config.n_embd, gain, norm_eps(config))
        self.mlp = SwiGLU(config) if config.arch == "llama" else ReLU2MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


def make_blocks(config, attend):
    """(the blocks, the final norm) of a llama or modern model; `attend` is the shared attention core."""
    if config.arch not in ARCHS[1:]:
        raise UserError(f"unknown arch {config.arch!r}: one of {', '.join(ARCHS)}")
    blocks = nn.ModuleList([Block(config, attend) for _ in range(config.n_layer)])
    return blocks, RMSNorm(config.n_embd, config.arch in ("llama", "simple"), norm_eps(config))


def init_simple(module):
    """The speedrun's plain-PyTorch reference init, for --arch simple: the embedding N(0, 1), every matrix
    N(0, 0.33 / fan_in) except the projections into the residual stream and the head (zero), biases zero
    (gains are made as ones)."""
    if isinstance(module, nn.Linear):
        if getattr(module, "ZERO_INIT", False):
            nn.init.zeros_(module.weight)
        else:
            nn.init.normal_(module.weight, std=(0.33 / module.in_features) ** 0.5)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=1.0)


# -----------------------------------------------------------------------------
# Muon on the blocks' matrices, AdamW on the rest


class Optimizers:
    """Several optimizers stepped as one: the training loop, checkpoints and resume see a single object."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def defaults(self):
        return self.optimizers["adamw"].defaults

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.optimizers):
            raise UserError(f"the checkpoint holds the state of {', '.join(sorted(state))}, this run has "
                            f"{', '.join(sorted(self.optimizers))}: resume with the checkpoint's --optimizer")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def muon_optimizers(model, args, fused):
    """
    Muon (Newton-Schulz orthogonalised momentum) on the 2-D matrices inside the blocks at --max_lr; AdamW
    on the rest: the embedding at --embed_lr when the head is untied, else with the head at --adam_lr, and
    the norms' gains and biases at --scalar_lr (default --adam_lr). Each group's "lr_scale" is its share of
    --max_lr, so the schedule scales every group alike. Weight decay: --weight_decay on Muon's matrices, and
    on AdamW's 2-D tensors only (as in GPT-2's), unless --adam_weight_decay sets AdamW's for all its groups.
    """
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"--optimizer muon needs torch.optim.Muon, in torch 2.9 and later (this is "
                        f"{torch.__version__}): pip install -U torch")
    in_blocks = {id(p) for p in model.transformer.h.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if id(p) in in_blocks and p.dim() == 2]
    wte = model.transformer.wte.weight
    untied = wte is not model.lm_head.weight
    rest = [p for p in params if id(p) not in {id(q) for q in matrices} and not (untied and p is wte)]

    def group(ps, lr, decay):
        return {"params": ps, "lr": lr, "lr_scale": lr / args.max_lr, "weight_decay": decay}

    matrix_decay = args.weight_decay if args.adam_weight_decay is None else args.adam_weight_decay
    scalar_decay = 0.0 if args.adam_weight_decay is None else args.adam_weight_decay
    adam_groups = [group([p for p in rest if p.dim() >= 2], args.adam_lr, matrix_decay),
                   group([p for p in rest if p.dim() < 2], args.scalar_lr or args.adam_lr, scalar_decay)]
    if untied:
        adam_groups.insert(0, group([wte], args.embed_lr, matrix_decay))
    adam_groups = [g for g in adam_groups if g["params"]]
    adamw = torch.optim.AdamW(adam_groups, betas=args.adam_betas, eps=args.adam_eps,
                              **({"fused": True} if fused else {}))
    # adjust_lr_fn "original": each update scaled by sqrt(max(1, rows / cols)), as in the speedrun
    muon = torch.optim.Muon([group(matrices, args.max_lr, args.weight_decay)], momentum=MUON_MOMENTUM[1],
                            nesterov=True, ns_coefficients=args.muon_ns_coefficients, ns_steps=args.muon_ns_steps,
                            adjust_lr_fn="original")
    return Optimizers(adamw=adamw, muon=muon)


def muon_momentum(step, warmup_steps):
    """Muon's momentum at this step: warmed up linearly over warmup_steps (0: none), then constant."""
    start, end = MUON_MOMENTUM
    frac = min(step / warmup_steps, 1.0) if warmup_steps else 1.0
    return (1 - frac) * start + frac * end


# -----------------------------------------------------------------------------
# Warmup, stable, decay


def wsd_lr(step, args):
    """Linear warmup over warmup_steps, --max_lr until the last cooldown_frac of the steps, then a straight
    line down to min_lr at max_steps."""
    max_lr, min_lr = args.max_lr, args.max_lr * args.min_lr_ratio
    if step < args.warmup_steps:
        return max_lr * (step + 1) / args.warmup_steps
    cooldown = max(1, round(args.cooldown_frac * args.max_steps))
    left = args.max_steps - step  # steps left, this one included
    if left >= cooldown:
        return max_lr
    return min_lr + (max_lr - min_lr) * max(left, 0) / cooldown


# -----------------------------------------------------------------------------
# The recipes: presets for train_gpt2.py's flags (flags given on the command line win)

RECIPES = {
    # OpenAI's GPT-2 124M, as the flags' own defaults have it
    "gpt2": {},
    # the same recipe with Llama's blocks: only the architecture changes
    "llama": {"arch": "llama"},
    # the modded-nanogpt speedrun at its 2024-11-03 record (UntieEmbed): 4578 steps of 2**19 tokens = 2.40B
    # tokens; no warmup, a linear cooldown over the last 28%, no weight decay; Muon at 0.05, Adam at 0.6
    # (embedding) and 0.008 (head), the learning rates of its records
    "speedrun": {"arch": "modern", "untie_head": True, "optimizer": "muon", "schedule": "wsd", "max_lr": 0.05,
                 "embed_lr": 0.6, "adam_lr": 0.008, "warmup_steps": 0, "cooldown_frac": 0.28, "min_lr_ratio": 0.0,
                 "weight_decay": 0.0, "max_steps": 4578},
    # the speedrun's plain-PyTorch reference, records/track_3_optimization/train_gpt_simple.py (2026-06-20):
    # 3250 steps of 2**19 tokens = 1.70B tokens to val loss 3.28 on FineWeb. 6 heads of 128, biases, RMSNorm
    # gains, half-truncated rotary, attention scale 0.12, an embedding norm, logits soft-capped at 15; Muon at
    # 0.025 (weight decay 0.05, Newton-Schulz (2, -1.5, 0.5) x 12, momentum 0.95 throughout), AdamW (0.8, 0.95),
    # eps 1e-10, decay 0.001 at 0.7 (embedding), 0.004 (head) and 0.015 (gains, biases); constant for 30% of
    # the steps, then down to zero; no clipping; val loss on the first 20 x 2**19 val tokens every 125 steps
    "speedrun-simple": {"arch": "simple", "n_head": 6, "bias": True, "rotary": "half", "attn_scale": 0.12,
                        "embed_norm": True, "logit_softcap": 15.0, "untie_head": True, "optimizer": "muon",
                        "max_lr": 0.025, "weight_decay": 0.05, "muon_ns_coefficients": (2.0, -1.5, 0.5),
                        "muon_ns_steps": 12, "muon_momentum_warmup": 0, "embed_lr": 0.7, "adam_lr": 0.004,
                        "scalar_lr": 0.015, "adam_betas": (0.8, 0.95), "adam_eps": 1e-10,
                        "adam_weight_decay": 0.001, "schedule": "wsd", "warmup_steps": 0, "cooldown_frac": 0.7,
                        "min_lr_ratio": 0.0, "grad_clip": 0.0, "max_steps": 3250, "eval_every": 125,
                        "val_tokens": 20 * 2**19},
}
