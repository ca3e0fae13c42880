"""
Sample text from a GPT-2: a checkpoint of train_gpt2.py or a transformers GPT-2 (hub name or directory).

    python sample.py                                       # the newest checkpoint in log/
    python sample.py -m log/model_19072.pt --prompt "The meaning of life is" --num_samples 4
    python sample.py -m gpt2 --max_new_tokens 200 --temperature 0.8 --top_k 40 --seed 1
    python sample.py -m log/model_00199.pt@init            # that run's model before its first step

Generation uses the model's KV cache: the prompt is run once, then one token per step.
"""

import contextlib
import sys

import torch

import train_gpt2
from machinery import checkpoints, common, runtime

INIT = "@init"  # PATH@init: the weights the checkpoint's run started from (its config and --seed)


def load_model(name, device):
    """A checkpoint, transformers folder or hub name as a GPT in eval mode on `device`; `PATH@init` rebuilds
    the run's initial weights, as train_gpt2.py made them before its first step."""
    if not name.endswith(INIT):
        return train_gpt2.GPT.from_pretrained(name).to(device).eval()
    ckpt = checkpoints.load_checkpoint(name[:-len(INIT)])
    if "seed" not in ckpt.get("args", {}):
        raise common.UserError(f"{name}: the checkpoint does not record its run's --seed, so its initial weights "
                               "are unknown")
    torch.manual_seed(ckpt["args"]["seed"])  # as build_model: seed, then the model, on the CPU
    return train_gpt2.GPT(train_gpt2.GPTConfig(**ckpt["config"])).to(device).eval()


def inference_context(device):
    """bf16 autocast on CUDA GPUs that compute it natively, as training evaluates; full precision elsewhere."""
    if device.startswith("cuda") and runtime.bf16_supported("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main(argv=None):
    p = common.ArgumentParser(description="Sample from a GPT-2 checkpoint.")
    p.add_argument("-m", "--model", default=None,
                   help="a train_gpt2.py .pt checkpoint (PATH@init: its run's weights before training), gpt2 / "
                        "gpt2-medium / ..., or a transformers directory (default: the newest checkpoint in log/)")
    p.add_argument("--prompt", default="Hello, I'm a language model,", help="the text to continue")
    p.add_argument("--num_samples", type=int, default=4, help="how many continuations")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to add to the prompt")
    p.add_argument("--temperature", type=common.finite_float, default=1.0,
                   help="below 1: more likely tokens; above: more random")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=42, help="the same seed gives the same samples")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    args = p.parse_args(argv)
    if args.num_samples <= 0 or args.max_new_tokens <= 0 or args.temperature <= 0 or args.top_k < 0 or args.seed < 0:
        p.error("--num_samples, --max_new_tokens and --temperature must be positive, --top_k and --seed >= 0")
    if not args.prompt:
        p.error("--prompt is empty: give some text for the model to continue")

    if args.model is None:
        found = checkpoints.list_checkpoints("log")
        if not found:
            sys.exit("sample.py: error: no checkpoint in log/ (train first, e.g. `python train_gpt2.py --first_try`); "
                     "or pass -m PATH or -m gpt2")
        args.model = found[0][1]
        print(f"model: {args.model}")
    try:
        device = runtime.single_device(args.device)
        enc = common.get_encoder()
        model = load_model(args.model, device)
    except common.UserError as e:
        sys.exit(f"sample.py: error: {e}")
    with inference_context(device):
        texts = train_gpt2.sample_text(model, enc, args.prompt, args.num_samples, args.max_new_tokens, device,
                                       args.seed, args.temperature, args.top_k or None)
    for i, text in enumerate(texts):
        print(f"--- sample {i}\n{text}")


if __name__ == "__main__":
    main()
