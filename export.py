"""
Export a train_gpt2.py checkpoint as a transformers directory, tokenizer included: GPT2LMHeadModel for
--arch gpt2, LlamaForCausalLM for --arch llama (--arch modern has no stock class and is refused).

    python export.py log/model_19072.pt gpt2-repro
    python -c "from transformers import pipeline; print(pipeline('text-generation', 'gpt2-repro')('Hello,'))"

The directory is what AutoModelForCausalLM.from_pretrained / AutoTokenizer.from_pretrained read, so
lm-evaluation-harness, transformers pipelines and the hub take it as they take OpenAI's GPT-2. To bring
such a directory back, every script here accepts it where it accepts a checkpoint (train_gpt2.GPT.from_pretrained).
"""

import os
import sys

from machinery import common, hf_convert
from train_gpt2 import GPT


def main(argv=None):
    p = common.ArgumentParser(description="Export a train_gpt2.py checkpoint to a transformers directory.")
    p.add_argument("checkpoint", help="a model_*.pt or ckpt_*.pt of train_gpt2.py")
    p.add_argument("out_dir", help="the directory to write (must not exist yet, or be empty)")
    args = p.parse_args(argv)

    if os.path.isdir(args.out_dir) and os.listdir(args.out_dir):
        sys.exit(f"export.py: error: {args.out_dir} is not empty; pass a new directory")
    if not os.path.isfile(args.checkpoint):
        sys.exit(f"export.py: error: checkpoint {args.checkpoint} does not exist")
    try:
        model = GPT.from_pretrained(args.checkpoint)
        hf_convert.export_to_transformers(model, args.out_dir)
    except common.UserError as e:
        sys.exit(f"export.py: error: {e}")
    kind = "LlamaForCausalLM" if model.config.arch == "llama" else "GPT2LMHeadModel"
    print(f"wrote {args.out_dir}: {kind} with {model.config.n_layer} layers, {model.config.n_embd} wide, "
          f"{model.config.block_size} positions, and its tokenizer")


if __name__ == "__main__":
    main()
