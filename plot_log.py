"""
Plot a run's log.txt: train and val loss, and HellaSwag accuracy against OpenAI's GPT-2 124M and GPT-3
Small (125M). play.ipynb draws the same figure; this makes it without Jupyter.

    python plot_log.py               # log/log.txt -> log/curves.png
    python plot_log.py path/to/log   # any run's folder (build-nanogpt's logs too)

The run's series are labelled with its own size and HellaSwag sample, read from the newest checkpoint
in the folder; a folder without one (e.g. build-nanogpt's) is labelled "this run".
"""

import os
import sys

import torch

import hellaswag
from machinery import checkpoints, common

# reference points (sources in the README): GPT-2 124M's val loss on FineWeb-Edu and its HellaSwag
# acc_norm as build-nanogpt measured them; GPT-3 Small's HellaSwag from the GPT-3 paper
GPT2_VAL_LOSS = 3.2924
GPT2_HELLASWAG = 0.294463
GPT3_SMALL_HELLASWAG = 0.337
HELLASWAG_VAL_EXAMPLES = 10042
CHANCE = 0.25  # four endings


def read_log(path):
    """{kind: {step: value}} of a log.txt; a later line for a step replaces an earlier one."""
    streams = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                step, kind, value = parts
                streams.setdefault(kind, {})[int(step)] = float(value)
    return streams


FINEWEB_EDU_PREFIXES = ("edufineweb_", "finewebedu_", "edu_fineweb_")  # fineweb.py's, and the downloads' shards


def on_fineweb_edu(ckpt):
    """Whether the run's val shard is FineWeb-Edu's (by its file name), where GPT-2's val loss was measured;
    None when the checkpoint does not say (older ones record no shard names)."""
    names = list(ckpt.get("data_identity", {}).get("val", {}))
    return names[0].startswith(FINEWEB_EDU_PREFIXES) if names else None


def describe_run(log_dir):
    """(label of the run, HellaSwag examples per point or None, whether its val shard is FineWeb-Edu's or
    None), from the newest readable checkpoint in log_dir."""
    for _, path in checkpoints.list_checkpoints(log_dir):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged file: try the one before
            continue
        tensors = {t.data_ptr(): t.numel() for t in ckpt["model"].values()}  # a tied matrix counted once
        size = sum(tensors.values())
        label = f"{size / 1e6:.0f}M" if size >= 1e6 else f"{size / 1e3:.0f}K"
        args = ckpt.get("args", {})
        hella = (args.get("hellaswag_limit") or HELLASWAG_VAL_EXAMPLES) if args.get("hellaswag", True) else None
        return f"this run ({label} parameters)", min(hella, HELLASWAG_VAL_EXAMPLES) if hella else None, \
            on_fineweb_edu(ckpt)
    return "this run", None, None


def plot(log_dir, out=None):
    """The figure of log_dir's run, saved as out (default log_dir/curves.png); returns (figure, path)."""
    import matplotlib  # imported here: the backend is chosen before pyplot is loaded
    import matplotlib.pyplot as plt

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")  # no display needed outside a notebook
    log_path = os.path.join(log_dir, "log.txt")
    if not os.path.exists(log_path):
        raise FileNotFoundError(f"no log at {log_path}: train first (python train_gpt2.py --first_try), "
                                "or point at a run's folder")
    streams = read_log(log_path)
    label, examples, fineweb_edu = describe_run(log_dir)

    def xy(kind):
        points = sorted(streams.get(kind, {}).items())
        return [s for s, _ in points], [v for _, v in points]

    fig, (ax_loss, ax_hella) = plt.subplots(1, 2, figsize=(16, 6))
    ax_loss.plot(*xy("train"), label=f"{label}: train loss", alpha=0.7)
    ax_loss.plot(*xy("val"), label=f"{label}: val loss")
    # GPT-2's val loss was measured on FineWeb-Edu's val shard: on other data the line compares nothing
    other_data = "" if fineweb_edu is not False else " (FineWeb-Edu; this run's val data is other text)"
    ax_loss.axhline(GPT2_VAL_LOSS, color="r", linestyle="--", label=f"OpenAI GPT-2 124M: val loss{other_data}")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    ax_loss.legend()

    n = f", {examples:,} examples per point" if examples else ""
    # the val file this machine holds now (a run records no digest of the one it scored)
    if hellaswag.not_the_real_val_set():
        n += " (a stand-in val file, not comparable to GPT-2's)"
    steps, accs = xy("hella")
    if examples:  # the sampling error of an accuracy over that many examples: +-2 standard errors
        errors = [2 * (a * (1 - a) / examples) ** 0.5 for a in accs]
        ax_hella.errorbar(steps, accs, yerr=errors, marker="o", capsize=3, label=f"{label}{n}, +-2 s.e.")
    else:
        ax_hella.plot(steps, accs, marker="o", label=f"{label}{n}")
    ax_hella.axhline(GPT2_HELLASWAG, color="r", linestyle="--", label="OpenAI GPT-2 124M (10,042 examples)")
    ax_hella.axhline(GPT3_SMALL_HELLASWAG, color="g", linestyle="--", label="OpenAI GPT-3 Small, 125M (paper)")
    ax_hella.axhline(CHANCE, color="gray", linestyle=":", label="chance (1 in 4)")
    ax_hella.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
    ax_hella.legend()
    fig.tight_layout()
    path = out or os.path.join(log_dir, "curves.png")
    fig.savefig(path, dpi=80)
    return fig, path


def main(argv=None):
    p = common.ArgumentParser(description="Plot a run's log.txt against GPT-2 124M and GPT-3 Small, as curves.png.")
    p.add_argument("log_dir", nargs="?", default="log", help="the run's folder (its log.txt)")
    args = p.parse_args(argv)
    try:
        _, path = plot(args.log_dir)
    except FileNotFoundError as e:
        sys.exit(f"plot_log.py: error: {e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
