"""
Plot a run's log.txt: train and val loss, and HellaSwag accuracy against OpenAI's GPT-2 124M and GPT-3
Small (125M); and CORE against GPT-2's when the run logged it (train_gpt2.py --core_every). play.ipynb draws
the same figure; this makes it without Jupyter.

    python plot_log.py               # log/log.txt -> log/curves.png
    python plot_log.py path/to/log   # any run's folder (build-nanogpt's logs too)

The run's series are labelled with its own size and HellaSwag sample, read from the newest checkpoint
in the folder; a folder without one (e.g. build-nanogpt's) is labelled "this run".
"""

import os
import sys


import hellaswag
from machinery import checkpoints, common

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
FINEWEB_PREFIXES = ("fineweb_",)  # llm.c's FineWeb shards, and fineweb.py --pretokenized fineweb-10B's


def val_data(ckpt):
    """Which val set the run scored, by its val shard's name: "FineWeb-Edu", "FineWeb" (where GPT-2's val
    losses were measured) or "other"; None when the checkpoint does not say (older ones record no names)."""
    names = list(ckpt.get("data_identity", {}).get("val", {}))
    if not names:
        return None
    return "FineWeb-Edu" if names[0].startswith(FINEWEB_EDU_PREFIXES) else \
        "FineWeb" if names[0].startswith(FINEWEB_PREFIXES) else "other"


def newest_checkpoint(log_dir):
    """The newest readable checkpoint in log_dir, loaded once for all the plot reads of it; None when there is
    none (build-nanogpt's folders)."""
    for _, path in checkpoints.list_checkpoints(log_dir):
        try:
            return checkpoints.load_checkpoint(path)  # a .pt file, or --fsdp's sharded folder read whole
        except common.UserError:  # a damaged one: try the one before
            continue
    return None


def gpt2_size(ckpt):
    """The baselines of the GPT-2 size the checkpoint's model has (its layers and width), or 124M's when it is
    none of the four or there is no checkpoint."""
    config = ckpt["config"] if ckpt else {}
    return hellaswag.gpt2_baselines(config.get("n_layer"), config.get("n_embd")) or \
        hellaswag.GPT2_SIZES[(12, 768)]


def describe_run(ckpt):
    """(label of the run, HellaSwag examples per point or None, its val data (see val_data) or None), from its
    newest checkpoint (None: "this run", and nothing known)."""
    if ckpt is None:
        return "this run", None, None
    tensors = {t.data_ptr(): t.numel() for t in ckpt["model"].values()}  # a tied matrix counted once
    size = sum(tensors.values())
    label = f"{size / 1e6:.0f}M" if size >= 1e6 else f"{size / 1e3:.0f}K"
    args = ckpt.get("args", {})
    hella = (args.get("hellaswag_limit") or hellaswag.VAL_EXAMPLES) if args.get("hellaswag", True) else None
    return f"this run ({label} parameters)", min(hella, hellaswag.VAL_EXAMPLES) if hella else None, val_data(ckpt)


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
    ckpt = newest_checkpoint(log_dir)
    label, examples, data = describe_run(ckpt)
    size = gpt2_size(ckpt)

    def xy(kind):
        points = sorted(streams.get(kind, {}).items())
        return [s for s, _ in points], [v for _, v in points]

    has_core = "core" in streams  # train_gpt2.py --core_every's lines: a third plot
    fig, axes = plt.subplots(1, 3 if has_core else 2, figsize=(24 if has_core else 16, 6))
    ax_loss, ax_hella = axes[:2]
    ax_loss.plot(*xy("train"), label=f"{label}: train loss", alpha=0.7)
    ax_loss.plot(*xy("val"), label=f"{label}: val loss")
    # GPT-2's val loss is known on FineWeb-Edu's val shard (124M) and FineWeb's (every size): on other data the
    # line compares nothing, and says so
    loss, where = (size["fineweb"], "FineWeb") if data == "FineWeb" or not size["fineweb_edu"] else \
        (size["fineweb_edu"], "FineWeb-Edu")
    other_data = "" if data in (None, where) else f" ({where}; this run's val data is other text)"
    ax_loss.axhline(loss, color="r", linestyle="--", label=f"OpenAI GPT-2 {size['name']}: val loss{other_data}")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")

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
    ax_hella.axhline(size["hella"], color="r", linestyle="--", label=f"OpenAI GPT-2 {size['name']} (10,042 examples)")
    gpt3, gpt3_hella = size["gpt3"]
    ax_hella.axhline(gpt3_hella, color="g", linestyle="--", label=f"OpenAI GPT-3 {gpt3} (paper)")
    ax_hella.axhline(CHANCE, color="gray", linestyle=":", label="chance (1 in 4)")
    ax_hella.set(xlabel="step", ylabel="acc_norm", title="HellaSwag")
    if has_core:
        draw_core(axes[2], *xy("core"), label, size)
    for ax in axes:  # under each plot, not over its curves and reference lines, and inside the image
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize="small")
    fig.tight_layout()
    path = out or os.path.join(log_dir, "curves.png")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return fig, path


def draw_core(ax, steps, scores, label, size):
    """CORE (core.py, nanochat's 22 tasks) against OpenAI's GPT-2 of the run's size, as nanochat measured it."""
    ax.plot(steps, scores, marker="o", label=f"{label}: CORE")
    ax.axhline(size["core"], color="r", linestyle="--", label=f"OpenAI GPT-2 {size['name']} (nanochat's measurement)")
    ax.axhline(0.0, color="gray", linestyle=":", label="chance (0: CORE is centred on it)")
    ax.set(xlabel="step", ylabel="centred accuracy", title="CORE")


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
