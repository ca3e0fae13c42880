"""
Weights between train_gpt2.py's GPT and transformers, both ways: --arch gpt2 as GPT2LMHeadModel,
--arch llama as LlamaForCausalLM.

Reading: OpenAI's released GPT-2s (gpt2 ... gpt2-xl) or any save_pretrained folder of a GPT-2 or of a
Llama this repo exported, as a GPTConfig's fields and a state dict that GPT.load_state_dict takes.
Writing: a GPT as a transformers folder with GPT-2's tokenizer files beside it, which transformers,
lm-evaluation-harness and the hub read. --arch modern and simple have no stock transformers class and
are refused.
"""

import json
import os
import shutil

import torch

from safetensors import SafetensorError
from tiktoken.load import read_file_cached

import variants
from machinery.common import UserError, first_line, write_failure

HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# transformers' GPT-2 keeps these four weights as (in, out) (its Conv1D), nn.Linear as (out, in)
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_model(name_or_path):
    """transformers' causal LM (GPT-2 or Llama here) from the hub or a save_pretrained directory."""
    # imported here, not at the top: transformers takes ~3 s to import, and training needs it only to read
    # OpenAI's weights
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:  # no such model / a folder without a config.json that names one
        raise UserError(f"could not load {name_or_path!r} with transformers ({first_line(e)}); "
                        "with no network, pass a local directory saved by save_pretrained") from None


def hf_weights(hf_model):
    """A transformers GPT-2's parameters by name, without its causal-mask buffers."""
    return {k: v for k, v in hf_model.state_dict().items() if not k.endswith((".attn.masked_bias", ".attn.bias"))}


def conv1d_transpose(name, tensor):
    """Conv1D <-> nn.Linear: the same transpose converts either way."""
    return tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor


def llama_names(n_layer):
    """(our name, transformers' LlamaForCausalLM name) of every weight of an --arch llama GPT."""
    names = [("transformer.wte.weight", "model.embed_tokens.weight"), ("transformer.ln_f.weight", "model.norm.weight"),
             ("lm_head.weight", "lm_head.weight")]
    per_layer = [("attn.c_q", "self_attn.q_proj"), ("attn.c_k", "self_attn.k_proj"), ("attn.c_v", "self_attn.v_proj"),
                 ("attn.c_proj", "self_attn.o_proj"), ("mlp.c_gate", "mlp.gate_proj"), ("mlp.c_fc", "mlp.up_proj"),
                 ("mlp.c_proj", "mlp.down_proj"), ("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")]
    for i in range(n_layer):
        names += [(f"transformer.h.{i}.{ours}.weight", f"model.layers.{i}.{theirs}.weight")
                  for ours, theirs in per_layer]
    return names


def from_transformers(name_or_path):
    """(GPTConfig fields, state dict in GPT's layout) of a transformers GPT-2 or Llama: hub name or directory."""
    if name_or_path not in HUB_NAMES and not os.path.isdir(name_or_path):
        raise UserError(f"--model {name_or_path!r} is neither one of {', '.join(HUB_NAMES)} "
                        "nor a directory holding a transformers GPT-2 or Llama checkpoint")
    hf_model = load_hf_model(name_or_path)
    if hf_model.config.model_type == "llama":
        return from_llama(name_or_path, hf_model)
    if hf_model.config.model_type != "gpt2":
        raise UserError(f"{name_or_path}: a transformers {hf_model.config.model_type} model; only GPT-2 and "
                        "Llama are read")
    hf = hf_model.config
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh") or hf.n_inner not in (None, 4 * hf.n_embd) \
            or hf.layer_norm_epsilon != 1e-5:
        raise UserError(f"{name_or_path}: only the GPT-2 architecture is supported (tanh GELU, 4x MLP, "
                        f"LayerNorm eps 1e-5); got {hf.activation_function}, n_inner={hf.n_inner}, "
                        f"eps={hf.layer_norm_epsilon}")
    config = dict(block_size=hf.n_positions, vocab_size=hf.vocab_size,
                  n_layer=hf.n_layer, n_head=hf.n_head, n_embd=hf.n_embd)
    return config, {k: conv1d_transpose(k, v) for k, v in hf_weights(hf_model).items()}


def from_llama(name_or_path, hf_model):
    """from_transformers for a LlamaForCausalLM of the shape --arch llama builds."""
    hf = hf_model.config
    theta = (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", getattr(hf, "rope_theta", None))
    width = variants.swiglu_hidden(hf.hidden_size)
    if hf.num_key_value_heads != hf.num_attention_heads or hf.intermediate_size != width \
            or theta != variants.ROPE_THETA or hf.hidden_act != "silu" or hf.attention_bias or hf.mlp_bias:
        raise UserError(f"{name_or_path}: only the Llama shape of --arch llama is read (no grouped KV heads, "
                        f"SwiGLU width {width}, RoPE theta {variants.ROPE_THETA:g}, no biases)")
    config = dict(block_size=hf.max_position_embeddings, vocab_size=hf.vocab_size, n_layer=hf.num_hidden_layers,
                  n_head=hf.num_attention_heads, n_embd=hf.hidden_size, arch="llama",
                  untie_head=not hf.tie_word_embeddings)
    sd = hf_model.state_dict()
    return config, {ours: sd[theirs] for ours, theirs in llama_names(hf.num_hidden_layers)}


def export_to_transformers(model, out_dir, vocab_size=50257):
    """
    Write a GPT as a transformers GPT-2 directory (GPT2LMHeadModel.from_pretrained loads it), with the
    embedding cut back to the tokenizer's `vocab_size` and GPT-2's tokenizer files beside it. The folder is
    written under a temporary name and renamed: it is complete or absent, and a failed export can be retried.
    """
    check_exportable(model.config, vocab_size)
    out_dir = os.path.normpath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} is not empty; pass a new directory")
    tmp = f"{out_dir}.{os.getpid()}.tmp"
    try:
        os.makedirs(tmp)
        write_transformers_folder(model, tmp, vocab_size)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, as checked above
        os.rename(tmp, out_dir)
    except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, a read-only folder
        raise UserError(f"could not write {out_dir} ({write_failure(tmp, e)}); nothing was left behind: free some "
                        "space or pick another folder, then rerun") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


def check_exportable(cfg, vocab_size):
    """Refuse, in one line, a model that no stock transformers class computes exactly."""
    if cfg.arch in ("modern", "simple"):
        raise UserError(f"--arch {cfg.arch} has no stock transformers class that computes it exactly (QK-norm on "
                        "each head and a ReLU^2 MLP together); export --arch gpt2 or llama models")
    if cfg.arch == "llama" and (cfg.bias or cfg.embed_norm or cfg.logit_softcap or cfg.attn_scale or
                                cfg.rotary != "full"):
        raise UserError("this --arch llama model has knobs beyond Llama's (--bias, --embed_norm, --logit_softcap, "
                        "--attn_scale or --rotary half) that LlamaForCausalLM does not compute; it cannot be exported")
    if cfg.vocab_size < vocab_size:
        raise UserError(f"the model's vocabulary ({cfg.vocab_size}) is smaller than GPT-2's tokenizer's ({vocab_size})")


def write_transformers_folder(model, out_dir, vocab_size):
    """The weights, config and tokenizer files of export_to_transformers, into an existing folder."""
    from transformers import GPT2Config, GPT2LMHeadModel  # slow to import: see load_hf_model

    cfg = model.config
    check_exportable(cfg, vocab_size)
    if cfg.arch == "llama":
        hf_model = llama_model(model, vocab_size)
        hf_model.save_pretrained(out_dir)
        write_gpt2_tokenizer(out_dir, cfg.block_size)
        return
    hf_model = GPT2LMHeadModel(GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256))
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in hf_weights(hf_model).items():
            # the padding rows past the tokenizer's vocabulary are never used: drop them
            w = sd[k][:vocab_size] if k in ("transformer.wte.weight", "lm_head.weight") else sd[k]
            v.copy_(conv1d_transpose(k, w))
    hf_model.save_pretrained(out_dir)
    write_gpt2_tokenizer(out_dir, cfg.block_size)


def llama_model(model, vocab_size):
    """An --arch llama GPT as a LlamaForCausalLM with the same weights (the vocabulary cut to the tokenizer's)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # slow to import: see load_hf_model

    cfg = model.config
    hf_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=variants.swiglu_hidden(cfg.n_embd),
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=variants.RMS_EPS, rope_theta=variants.ROPE_THETA,
        hidden_act="silu",
        tie_word_embeddings=not cfg.untie_head, bos_token_id=50256, eos_token_id=50256))
    sd, theirs = model.state_dict(), hf_model.state_dict()
    with torch.no_grad():
        for ours, name in llama_names(cfg.n_layer):
            w = sd[ours][:vocab_size] if name in ("model.embed_tokens.weight", "lm_head.weight") else sd[ours]
            theirs[name].copy_(w)
    return hf_model


def write_gpt2_tokenizer(out_dir, max_length):
    """GPT-2's own tokenizer files (vocab.json = encoder.json, merges.txt = vocab.bpe), as tiktoken fetches
    and caches them, so an exported model loads with its tokenizer offline, e.g. in lm-evaluation-harness."""
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
