"""
Compare models in the browser: two or more models continue the same prompt side by side, streaming
token by token, each with the same seed. By default the newest checkpoint in log/ before and after
training: its run's initial weights (PATH@init, rebuilt from its config and seed) and the checkpoint.

    pip install gradio
    python app.py                                    # log/'s newest checkpoint at init and trained, on :7860
    python app.py -m log/model_00000.pt -m gpt2-repro -m gpt2 --share

Models: train_gpt2.py checkpoints (.pt), folders written by export.py or save_pretrained, and hub names
(gpt2, ...) where the hub is reachable. Each is loaded once. The text comes from the same code as
sample.py's, so for the same model, prompt, seed and settings the two print the same continuation.
"""

import html
import importlib.util
import math
import os
import re
import sys


import sample
import train_gpt2
from machinery import checkpoints, common, runtime

MAX_NEW_TOKENS = 512


class Models:
    """The models the page offers, each loaded on first use and kept, with what its checkpoint records."""

    def __init__(self, names, device):
        self.names, self.device, self.loaded = list(names), device, {}

    def get(self, name):
        """(model, description); a UserError names a missing or damaged file."""
        if name not in self.loaded:
            self.loaded[name] = (sample.load_model(name, self.device), describe(name))
        return self.loaded[name]


def describe(name):
    """What a checkpoint records: step, tokens seen, val loss, and HellaSwag from the log beside it."""
    if name.endswith(sample.INIT):
        return "step 0: its run's initial weights (before training)"
    if not checkpoints.is_checkpoint(name):
        return "transformers model"
    ckpt = checkpoints.load_checkpoint(name, weights=False)
    step, args = ckpt["step"], ckpt.get("args", {})
    parts = [f"step {step:,}"]
    if "total_batch_size" in args:
        parts.append(f"{step * args['total_batch_size']:,} tokens seen")
    if ckpt.get("val_loss") is not None:
        parts.append(f"val loss {ckpt['val_loss']:.4f}")
    log = os.path.join(os.path.dirname(name), "log.txt")
    if os.path.exists(log):
        with open(log) as f:
            hella = [line.split()[2] for line in f if line.startswith(f"{step} hella ")]
        if hella:
            parts.append(f"HellaSwag {float(hella[-1]):.4f}")
    return " | ".join(parts)


def default_models(log_dir):
    """Before and after training: the newest checkpoint in log_dir at its run's initial weights, and as it is."""
    found = checkpoints.list_checkpoints(log_dir)
    return [found[0][1] + sample.INIT, found[0][1]] if found else []


def check_settings(prompt, max_new_tokens, temperature, top_k, seed):
    """The sampling settings as numbers, or a message for the page naming what is wrong."""
    if not prompt or not prompt.strip():
        return "the prompt is empty: type some text for the models to continue"
    values = {"length": max_new_tokens, "temperature": temperature, "top-k": top_k, "seed": seed}
    for what, value in values.items():
        if value is None or not math.isfinite(float(value)):
            return f"{what} must be a number, got {value}"
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS or max_new_tokens != int(max_new_tokens):
        return f"length must be a whole number of tokens from 1 to {MAX_NEW_TOKENS}, got {max_new_tokens}"
    if temperature <= 0:
        return f"temperature must be above 0, got {temperature}"
    if top_k < 0 or seed < 0 or top_k != int(top_k) or seed != int(seed):
        return "top-k and seed must be whole numbers >= 0"
    return None


def compare(models, names, prompt, max_new_tokens, temperature, top_k, seed):
    """Yields {name: {"text", "about"}} as every model adds a token; raises ValueError for bad input."""
    problem = check_settings(prompt, max_new_tokens, temperature, top_k, seed) or \
        (None if names else "pick at least one model")
    if problem:
        raise ValueError(problem)
    try:
        loaded = {name: models.get(name) for name in names}
        enc = common.get_encoder()
    except common.UserError as e:
        raise ValueError(str(e)) from None
    streams = {name: train_gpt2.sample_stream(model, enc, prompt, 1, int(max_new_tokens), models.device, int(seed),
                                   float(temperature), int(top_k) or None) for name, (model, _) in loaded.items()}
    texts = {name: prompt for name in names}
    for _ in range(int(max_new_tokens)):
        with sample.inference_context(models.device):  # as sample.py
            for name, stream in streams.items():
                texts[name] = next(stream)[0]
        yield {name: {"text": texts[name], "about": loaded[name][1]} for name in names}


def render(results):
    """The continuations side by side, each with what its checkpoint records under it."""
    columns = "".join(
        f'<div style="flex:1;min-width:16em"><h3>{html.escape(name)}</h3>'
        f'<pre style="white-space:pre-wrap" class="continuation">{html.escape(r["text"])}</pre>'
        f'<p><small>{html.escape(r["about"])}</small></p></div>' for name, r in results.items())
    return f'<div style="display:flex;gap:1em">{columns}</div>'


def build_page(models, chosen):
    """The Gradio page: models, prompt and sampling controls, then the outputs side by side."""
    import gradio as gr  # an optional dependency: main() checks for it first

    def run(names, extra, prompt, max_new_tokens, temperature, top_k, seed):
        names = list(names) + [n.strip() for n in re.split(r"[,\n]", extra or "") if n.strip()]
        try:
            for results in compare(models, names, prompt, max_new_tokens, temperature, top_k, seed):
                yield render(results), results
        except ValueError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title="Compare GPT-2 models") as page:
        gr.Markdown("## The same prompt, the same seed, several models")
        with gr.Row():
            names = gr.CheckboxGroup(models.names, value=chosen, label="models")
            extra = gr.Textbox(label="more models: checkpoint paths, transformers folders or hub names, one per line")
        prompt = gr.Textbox(value="Hello, I'm a language model,", label="prompt", elem_id="prompt")
        with gr.Row():
            length = gr.Number(value=64, label=f"length (new tokens, up to {MAX_NEW_TOKENS})")
            temperature = gr.Number(value=1.0, label="temperature")
            top_k = gr.Number(value=50, label="top-k (0: all)")
            seed = gr.Number(value=42, label="seed")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        shown = gr.HTML(elem_id="outputs")
        raw = gr.JSON(label="the texts", visible=False)
        button.click(run, [names, extra, prompt, length, temperature, top_k, seed], [shown, raw], api_name="compare")
    return page


def main(argv=None):
    p = common.ArgumentParser(description="Compare models' continuations side by side in the browser (Gradio).")
    p.add_argument("-m", "--model", action="append", default=None,
                   help="a checkpoint (PATH@init: its run before training), transformers folder or hub name; repeat "
                        "for more (default: the newest checkpoint in --log_dir, at init and trained)")
    p.add_argument("--log_dir", default="log", help="where to find checkpoints to offer")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    p.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="the port to serve on")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    args = p.parse_args(argv)
    if importlib.util.find_spec("gradio") is None:  # an optional dependency
        sys.exit("app.py: error: the app needs Gradio, which is not installed: pip install gradio")

    chosen = args.model or default_models(args.log_dir)
    if not chosen:
        sys.exit(f"app.py: error: no checkpoint in {args.log_dir}/ (train first, e.g. `python train_gpt2.py "
                 "--first_try`); or pass -m PATH or -m gpt2")
    offered = sorted({*chosen, *(path for _, path in checkpoints.list_checkpoints(args.log_dir))})
    try:
        models = Models(offered, runtime.single_device(args.device))
        for name in chosen:  # loaded once, before the page opens
            models.get(name)
    except common.UserError as e:
        sys.exit(f"app.py: error: {e}")
    build_page(models, chosen).queue().launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
