"""
Device and speed tooling for train_gpt2.py. None of it changes what is computed, only how fast:

- peak FLOP/s tables and MFU, and --benchmark's summary line
- the choice of SDPA kernel (--sdpa_backend) and compile modes
- -B auto: the largest micro-batch that fits in GPU memory
- DevicePrefetcher (the next batch on its way while the device works) and SyntheticLoader (random tokens)
- ChunkedCrossEntropy (--chunked_ce): lm_head and the loss without the whole batch's logits
- keep_freed_cpu_memory (--keep_freed_memory): glibc's malloc tuned for training steps on CPU
- recompute_blocks (--recompute): activation checkpointing, block by block
"""

import contextlib
import ctypes
import functools
import json
import os
import re
import resource
import sys

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from machinery.common import UserError, first_line
from machinery.runtime import synchronize

# -----------------------------------------------------------------------------
# CPU memory

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt()'s parameter numbers in glibc's malloc.h


def keep_freed_cpu_memory():
    """glibc gives every freed block over 32 MiB back to the kernel, so the next step pays again to have it
    mapped and zeroed: with a small GPT's (B*T, 50304) logits that was about half of each CPU step. Freed
    memory stays in the process instead, as PyTorch's caching allocator does on GPUs: same math, more peak
    memory. Linux with glibc only, and left alone when the user chose the allocator or its settings.
    Returns whether it applied."""
    chosen = [k for k in os.environ if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")]
    if not sys.platform.startswith("linux") or chosen:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, or no libc.so.6
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# -----------------------------------------------------------------------------
# Peak FLOP/s and MFU

# Peak TFLOP/s from NVIDIA's data sheets: dense (no sparsity) bf16 tensor-core figures, and fp32 for the GPUs that
# only emulate bf16 (V100, T4: they train in fp32 by default). Each pattern must match the whole device name, less
# its "NVIDIA "/"Tesla "/"GeForce " prefix: "H100 NVL" is not an H100 SXM.
BF16, FP32 = "dense bf16", "fp32"
GPU_PEAK_TFLOPS = [
    (r"B200", 2250.0, BF16), (r"H100( 80GB HBM3| SXM5 \d+GB)?", 989.5, BF16), (r"H100 PCIe", 756.5, BF16),
    (r"H100 NVL", 835.5, BF16), (r"H200( \d+GB HBM3e)?", 989.5, BF16), (r"H200 NVL", 835.5, BF16),
    (r"GH200( \d+GB)?", 989.5, BF16), (r"H800( \d+GB HBM3)?", 989.5, BF16), (r"H800 PCIe", 756.5, BF16),
    (r"A100(-SXM4-\d+GB|-PCIE-\d+GB| \d+GB PCIe)?", 312.0, BF16), (r"A800(-SXM4-\d+GB| \d+GB PCIe)?", 312.0, BF16),
    (r"L40S", 362.1, BF16), (r"L40", 181.0, BF16), (r"L4", 121.0, BF16), (r"A10G", 70.0, BF16), (r"A10", 125.0, BF16),
    (r"RTX 4090", 165.2, BF16), (r"RTX 3090", 71.0, BF16), (r"RTX A6000", 154.8, BF16),
    (r"V100-SXM2-\d+GB", 15.7, FP32), (r"V100-PCIE-\d+GB", 14.0, FP32), (r"V100S-PCIE-\d+GB", 16.4, FP32),
    (r"T4", 8.1, FP32),
]


def gpu_peak(name):
    """(TFLOP/s, which figure) for a CUDA device name from the table, or None when it is not there."""
    short = re.sub(r"^(NVIDIA |Tesla |GeForce )+", "", name.strip())
    return next(((tf, figure) for pattern, tf, figure in GPU_PEAK_TFLOPS if re.fullmatch(pattern, short)), None)


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
        peak = gpu_peak(torch.cuda.get_device_name())
        return peak and peak[0] * 1e12
    if device_type == "cpu":
        return cpu_peak_flops()
    return None


def peak_flops_source(device_type, override_tflops=None):
    """What MFU is measured against, in words, for the run's description."""
    if override_tflops:
        return f"--peak_tflops {override_tflops:g}"
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        peak = gpu_peak(name)
        return peak and f"{name}'s {peak[1]} peak, {peak[0]:g} TFLOP/s"
    peak = cpu_peak_flops() if device_type == "cpu" else None
    return peak and f"the CPU's fp32 FMA peak over {torch.get_num_threads()} threads, {peak / 1e12:.2f} TFLOP/s"


def mfu_percent(flops_per_token, tokens_per_sec, peak_flops, world_size):
    """Model FLOPs utilisation: the FLOPs the model needs per second, over what the devices could do."""
    return 100 * flops_per_token * tokens_per_sec / (peak_flops * world_size)


def peak_memory_bytes(device_type):
    """The GPU's peak reserved bytes (what the caching allocator held: what must fit, fragmentation included;
    the tensors' own peak, max_memory_allocated, is lower), or on CPU the process's peak resident memory
    (Linux: VmHWM, which reset_peak_memory can reset; elsewhere ru_maxrss, in bytes on macOS)."""
    if device_type == "cuda":
        return torch.cuda.max_memory_reserved()
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_memory(device_type):
    """From here on, peak_memory_bytes counts anew (--benchmark: the steps, not the setup before them; under
    --fsdp each rank builds the whole model before it keeps its shards). On CPU: Linux's clear_refs."""
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident memory
    except OSError:
        pass  # not Linux: the peak since the process started


def print_benchmark(args, step_times, flops_per_token, peak_flops, world_size, device_type, state_bytes=None):
    """The median step after warm-up (the first fifth of the steps, at least one: compilation, allocator).
    state_bytes: what this process holds of the weights, gradients and optimizer state (model_state_bytes)."""
    warmup = max(1, len(step_times) // 5)
    measured = sorted(step_times[warmup:] or step_times)
    ms = 1000 * measured[len(measured) // 2]
    tokens_per_sec = args.total_batch_size / (ms / 1000)
    mfu = mfu_percent(flops_per_token, tokens_per_sec, peak_flops, world_size) if peak_flops else None
    peak_memory = peak_memory_bytes(device_type) / 2 ** 30
    result = dict(ms_per_step=round(ms, 2), tokens_per_sec=round(tokens_per_sec), mfu=mfu and round(mfu, 2),
                  peak_memory_gib=round(peak_memory, 2), steps_measured=len(measured), warmup_steps=warmup)
    if state_bytes is not None:
        result["state_gib"] = round(state_bytes / 2 ** 30, 3)
    print(f"benchmark: median {ms:.2f} ms/step over {len(measured)} steps after {warmup} warm-up | "
          f"{tokens_per_sec:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{mfu:.2f}%'} | "
          f"peak {'GPU memory (reserved)' if device_type == 'cuda' else 'process memory'} {peak_memory:.2f} GiB"
          + ("" if state_bytes is None else f" | weights, gradients, optimizer state {state_bytes / 2 ** 30:.3f} "
                                            "GiB in this process"))
    print("BENCHMARK " + json.dumps(result))  # for benchmarks/ladder.py


def model_state_bytes(model, optimizer):
    """The bytes of the weights, their gradients and the optimizer's state that this process holds: all of
    them under DDP, its shards under --fsdp (a DTensor's local part)."""
    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = sum(local_bytes(p) + (local_bytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    states = [opt.state for opt in getattr(optimizer, "optimizers", {"": optimizer}).values()]
    return total + sum(local_bytes(v) for state in states for moments in state.values() for v in moments.values()
                       if torch.is_tensor(v))


# -----------------------------------------------------------------------------
# Kernel choices

COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# --sdpa_backend: torch's name of each choice's kernel (CPU kernels obey flash and math too)
SDPA_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                 "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
_sdpa_choice = contextlib.ExitStack()  # the chosen kernels, held from the choice to the process's end


def select_sdpa_backend(name, device_type):
    """Enable only the chosen kernel for F.scaled_dot_product_attention, first in torch's priority order, and
    math after it: the calls a fast kernel refuses (the KV cache's boolean mask at every evaluation's samples,
    fp32 for flash and cudnn) fall back to math instead of failing with "No available kernel". Without the
    order, torch takes math whenever its default order puts math first (before cuDNN, on many builds). auto:
    torch's own choice per call, as it was before any choice."""
    _sdpa_choice.close()  # back to torch's defaults
    if SDPA_BACKENDS[name] is None:
        return
    if device_type != "cuda" and name not in ("flash", "math"):
        raise UserError(f"--sdpa_backend {name} needs a CUDA GPU; on {device_type} use auto, flash or math")
    backends = list(dict.fromkeys([getattr(SDPBackend, SDPA_BACKENDS[name]), SDPBackend.MATH]))
    _sdpa_choice.enter_context(sdpa_kernel(backends, set_priority=True))


def sdpa_kernel_in_use(n_head, T, head_size, device, dtype):
    """The name of the kernel F.scaled_dot_product_attention picks now for causal attention of this shape
    (torch's own dispatch: torch._fused_sdp_choice)."""
    q = torch.zeros(1, n_head, T, head_size, device=device, dtype=dtype)
    return SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name


# -----------------------------------------------------------------------------
# Memory arithmetic before anything is built


def device_memory_bytes(device_type):
    """What one process may fill: a GPU's whole memory, or on CPU the host's RAM (None where unknown: MPS)."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if device_type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def memory_floor(n_params, config, B, T, dtype, optimizer_moments=2, shards=1, recompute=False, chunked_ce=False):
    """(state, activations): bytes that one process needs, reckoned on the low side. State: fp32
    weights, gradients and the optimizer's moments (AdamW's two; split across `shards` under FSDP).
    Activations of one micro-batch: per block at least 16 saved values per token and channel (the norms' and
    matmuls' inputs: C + C + 3C + C + C + C + 4C + 4C), only the block's input under recompute; and the logits
    with their fp32 softmax, 8 bytes per vocabulary entry per token (none with the chunked loss)."""
    state = 4 * n_params * (2 + optimizer_moments) / shards
    value = 2 if dtype == "bf16" else 4
    per_block = (1 if recompute else 16) * config.n_embd * value
    logits = 0 if chunked_ce else 8 * config.vocab_size
    return state, B * T * (config.n_layer * per_block + logits)


MARGIN = 1.5  # check_memory's room to spare


def check_memory(n_params, config, args, device_type, world_size, dtype, B, optimizer_moments=2, total=None):
    """Refuse at once, in one line, a run whose memory_floor does not fit the device (on CPU, the host, which
    all processes share), naming what would: a smaller -B, --chunked_ce, --recompute, --fsdp on GPUs, a
    smaller --model. A run under the floor may still run out; one over it would, after minutes of building."""
    total = total or device_memory_bytes(device_type)
    if total is None:
        return
    processes = world_size if device_type == "cpu" else 1  # CPU processes share one host's memory
    shards = world_size if args.fsdp else 1

    def floor(b, **changes):  # (state, activations) of this run at micro-batch b, with changes to its flags
        options = dict(optimizer_moments=optimizer_moments, shards=shards, recompute=args.recompute,
                       chunked_ce=bool(args.chunked_ce))
        return memory_floor(n_params, config, b, args.seq_len, dtype, **{**options, **changes})

    def need(b, **changes):
        return processes * sum(floor(b, **changes))

    if need(B) <= total:
        return
    state, activations = floor(B)
    where = "GPU" if device_type == "cuda" else f"host ({processes} process{'es' if processes > 1 else ''})"
    # a fix is named only with room to spare: real peaks run above the floor (GPT-2 124M on CPU at -B 2: 4.98 GB
    # measured, the floor 4.0 GB; the activations 1.5x theirs)
    fixes = [f"-B {b}" for b in micro_batch_candidates(args.total_batch_size, args.seq_len, world_size)
             if b < B and MARGIN * need(b) <= total][:1]
    if not args.chunked_ce and MARGIN * need(B, chunked_ce=True) <= total:
        fixes.append("--chunked_ce 8192")
    if not args.recompute and MARGIN * need(B, recompute=True) <= total:
        fixes.append("--recompute")
    if device_type == "cuda" and not args.fsdp:
        fixes.append("--fsdp across more GPUs (under torchrun)")
    fixes.append("a smaller --model or -T")
    raise UserError(f"this run needs at least {state / 1e9:.1f} GB per process for the weights, gradients and "
                    f"optimizer state and {activations / 1e9:.1f} GB for one micro-batch's activations at -B {B}, "
                    f"and the {where} has {total / 1e9:.1f} GB: try {', or '.join(fixes)}")


# -----------------------------------------------------------------------------
# -B auto: the largest micro-batch that fits


def micro_batch_candidates(total_batch_size, T, world_size):
    """The micro-batch sizes that divide one process's share of the total batch, largest first."""
    per_process = total_batch_size // (T * world_size)
    return [b for b in range(per_process, 0, -1) if total_batch_size % (b * T * world_size) == 0]


def out_of_memory(e):
    """The device refused an allocation: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError, raised
    here or anywhere down the chain of causes (torch.compile wraps one met while compiling in
    BackendCompilerFailed). Returns that error, or None."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def allocation_failure(e):
    """An out-of-memory error's first line in words, short, but with the size it asked for whole: CPU's allocator
    says "you tried to allocate 52710866944 bytes", which a plain cut to length left as "527108"."""
    line = first_line(e)
    asked = re.search(r"allocate (\d+) bytes", line)
    if asked:
        return f"the allocator refused {int(asked.group(1)):,} bytes"
    return line if len(line) <= 160 else line[:160].rsplit(" ", 1)[0] + " ..."


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


def auto_micro_batch(model, raw_model, candidates, T, autocast_ctx, device, ddp):
    """-B auto for a run: room is held back for AdamW's two moments (and DDP's gradient buckets), which
    come after the probe; under DDP every rank takes the smallest micro-batch any of them found."""
    param_bytes = sum(p.numel() * p.element_size() for p in raw_model.parameters())
    B = largest_micro_batch(model, candidates, T, raw_model.config.vocab_size, autocast_ctx, device,
                            (2 + ddp) * param_bytes)
    if ddp:
        found = torch.tensor(B, device=device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        B = int(found.item())
    # the probes' graphs go: they saw several batch sizes (so their batch dimension turned dynamic) and no DDP,
    # whose graph splitting lets the gradient all-reduce overlap the backward; training compiles its own
    torch._dynamo.reset()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)  # --benchmark's peak memory is training's, not the probes'
    return B


# -----------------------------------------------------------------------------
# Batches: random ones for benchmarks, and the next one prefetched to the device


class SyntheticLoader:
    """Random tokens in place of shards, for measuring speed with no data on disk (--synthetic)."""

    def __init__(self, B, T, process_rank, num_processes, split, vocab_size, seed=0):
        self.B, self.T, self.num_processes, self.vocab_size = B, T, num_processes, vocab_size
        self.shards, self.skipped = [], []
        self.seed = 2 * (seed * 1000 + process_rank) + (split == "val")  # its own stream per rank and split
        self.reset()

    def reset(self):
        self.generator = torch.Generator().manual_seed(self.seed)

    def next_batch(self):
        buf = torch.randint(0, self.vocab_size, (self.B * self.T + 1,), generator=self.generator)
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
# The loss without the whole batch's logits


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


def chunked_cross_entropy(x, weight, targets, chunk_rows):
    """The mean loss of lm_head(x) against targets, with x (B, T, C), through ChunkedCrossEntropy."""
    return ChunkedCrossEntropy.apply(x.view(-1, x.size(-1)), weight, targets.view(-1), chunk_rows,
                                     torch.is_grad_enabled())


# -----------------------------------------------------------------------------
# Activation checkpointing


def recompute_blocks(model):
    """--recompute: each block keeps only its input for the backward pass, which runs the block's forward
    again to get the rest (torch.utils.checkpoint). Activation memory falls from every intermediate of
    every block to one (B, T, n_embd) tensor per block; the cost is one more forward, about a third of a
    step. The same operations on the same inputs: the same numbers."""
    for block in model.transformer.h:
        block.forward = functools.partial(recomputed_forward, block.forward)


def recomputed_forward(forward, x, cache=None):
    if cache is not None or not torch.is_grad_enabled():  # generation and evaluation keep nothing anyway
        return forward(x, cache)
    return checkpoint(forward, x, use_reentrant=False)
