"""
What a machine offers the training run, in a few seconds, before anything long runs on it: torch, CUDA and
cuDNN versions, the GPU, native bf16, the SDPA kernel the model's attention really gets under each
--sdpa_backend (torch's own dispatch, torch._fused_sdp_choice), and that every torch API the newer paths call
exists with the arguments they pass. A line per fact; a missing API says MISSING, and the exit code is 1.

    python benchmarks/gpu_probe.py            # benchmarks/gpu.sh first runs it before anything else
"""

import argparse
import importlib
import inspect
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from machinery import runtime, speed  # noqa: E402
from machinery.common import UserError  # noqa: E402


def versions(device_type):
    print(f"torch {torch.__version__} | CUDA {torch.version.cuda} | cuDNN {torch.backends.cudnn.version()}")
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"GPU {props.name} | compute capability {props.major}.{props.minor} | "
              f"{props.total_memory / 2**30:.1f} GiB | {torch.cuda.device_count()} visible")
        print(f"peak for MFU: {speed.peak_flops_source('cuda')}")
    else:
        print(f"no CUDA GPU: {device_type} (a dry run of the probe)")
    print(f"native bf16: {runtime.bf16_supported(device_type)}")


def attention_kernels(device_type, n_head=12, T=1024, head_size=64):
    """The kernel GPT-2 124M's attention gets under each --sdpa_backend, in the run's dtype; each one is also
    called once, so a kernel that is chosen but fails says so here."""
    device = "cuda" if device_type == "cuda" else "cpu"
    dtype = torch.bfloat16 if runtime.bf16_supported(device_type) else torch.float32
    q = torch.randn(1, n_head, T, head_size, device=device, dtype=dtype)
    for name in ("auto", "flash", "cudnn", "efficient"):
        try:
            speed.select_sdpa_backend(name, device_type)
            kernel = speed.sdpa_kernel_in_use(n_head, T, head_size, device, dtype)
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            print(f"attention (B, {n_head}, {T}, {head_size}) {str(dtype).split('.')[1]}, --sdpa_backend {name}: "
                  f"{kernel}")
        except (UserError, RuntimeError) as e:
            print(f"attention, --sdpa_backend {name}: not available ({str(e).splitlines()[0][:150]})")
        finally:
            speed.select_sdpa_backend("auto", device_type)


def has(what, check):
    """One API line: ok, or MISSING with why. Returns whether it is there."""
    try:
        problem = check()
    except Exception as e:  # an import or an attribute that is not there
        problem = f"{type(e).__name__}: {e}"
    print(f"api {what}: {'ok' if not problem else 'MISSING (' + str(problem) + ')'}")
    return not problem


def parameters(fn, *names):
    """None when fn takes every one of names, else which it lacks."""
    missing = [n for n in names if n not in inspect.signature(fn).parameters]
    return missing and f"no {', '.join(missing)}"


def module(name):
    """The module, imported when its check runs: one that is missing fails its own line, not the probe."""
    return importlib.import_module(name)


def muon():
    w = torch.nn.Parameter(torch.randn(8, 4))
    torch.optim.Muon([w], lr=0.02, momentum=0.95, nesterov=True, ns_coefficients=(2.0, -1.5, 0.5), ns_steps=2,
                     adjust_lr_fn="original")  # the arguments variants.muon_optimizers passes


def apis():
    """The newer torch APIs the recipe's paths call; True when all are there."""
    checks = [
        ("torch.optim.Muon (--optimizer muon)", muon),
        ("torch.distributed.fsdp.fully_shard (--fsdp)", lambda: module("torch.distributed.fsdp").fully_shard and None),
        ("FSDPModule.set_requires_gradient_sync, set_reshard_after_forward",
         lambda: [getattr(module("torch.distributed.fsdp").FSDPModule, n) for n in
                  ("set_requires_gradient_sync", "set_reshard_after_forward", "unshard", "reshard")] and None),
        ("torch.distributed.checkpoint.load(no_dist=)",
         lambda: parameters(module("torch.distributed.checkpoint").load, "no_dist")),
        ("get_model_state_dict, get_optimizer_state_dict",
         lambda: [getattr(module("torch.distributed.checkpoint.state_dict"), n) for n in
                  ("get_model_state_dict", "get_optimizer_state_dict")] and None),
        ("distribute_tensor(src_data_rank=)",
         lambda: parameters(module("torch.distributed.tensor").distribute_tensor, "src_data_rank")),
        ("torch.compiler.set_stance (evaluations eager under --fsdp)", lambda: torch.compiler.set_stance and None),
        ("sdpa_kernel(set_priority=) (--sdpa_backend)",
         lambda: parameters(module("torch.nn.attention").sdpa_kernel, "set_priority")),
        ("torch._fused_sdp_choice", lambda: torch._fused_sdp_choice and None),
        ("nn.Module.compile (--fsdp --compile)", lambda: torch.nn.Module.compile and None),
        ("AdamW(fused=)", lambda: parameters(torch.optim.AdamW, "fused")),
    ]
    return all([has(what, check) for what, check in checks])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: the first available)")
    args = p.parse_args(argv)
    device_type = runtime.check_device_type(args.device)
    versions(device_type)
    attention_kernels(device_type)
    sys.exit(0 if apis() else 1)


if __name__ == "__main__":
    main()
