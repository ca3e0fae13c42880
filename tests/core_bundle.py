"""
A stand-in for nanochat's CORE eval bundle (core.py), written by the tests: a few tasks of each type, with the
quirks the real one has (few-shot prompts, delimiters, choices that share words, contexts with trailing spaces).
"""

import json
import random
import zipfile

WORDS = ("the king queen river stone bread night morning sword letter garden horse winter summer castle "
         "mother father child candle window bell road ship").split()
# label, type, shots, delimiter, category, random baseline (percent)
TASKS = [("mc_zero", "multiple_choice", 0, " ", "reading", 25.0),
         ("mc_three", "multiple_choice", 3, "\nAnswer: ", "reading", 25.0),
         ("schema_two", "schema", 2, " ", "commonsense", 50.0),
         ("lm_one", "language_modeling", 1, " ", "language", 0.0),
         ("lm_tight", "language_modeling", 0, "", "language", 0.0)]


def phrase(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_items(kind, n, seed, lead=""):
    """n items of a task type, in the bundle's JSON: choices that share leading words, contexts with trailing
    spaces (which language modelling's template trims), numbers among the choices."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        if kind == "multiple_choice":
            choices = [f"the {phrase(rng, rng.randint(1, 3))}" for _ in range(3)] + [rng.randint(1, 99)]
            items.append(dict(query=f"{phrase(rng, 6)}?", choices=choices, gold=rng.randrange(4)))
        elif kind == "schema":
            items.append(dict(context_options=[phrase(rng, rng.randint(3, 8)) for _ in range(3)],
                              continuation=phrase(rng, 3) + ".", gold=rng.randrange(3)))
        else:
            items.append(dict(context=phrase(rng, rng.randint(4, 12)) + rng.choice(["", " ", "  \n"]),
                              continuation=lead + phrase(rng, rng.randint(1, 2))))
    return items


def write_bundle(path, tasks=TASKS, n=24, drop=None, kind_of=None, bad_line=None):
    """A stand-in for nanochat's eval_bundle.zip, laid out as it is: eval_bundle/core.yaml, eval_meta_data.csv and
    eval_data/<category>/<task>.jsonl; optionally without one task's file, with a task of another type, or with
    a line that is not JSON."""
    config = "icl_tasks:\n"
    meta = "Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i, (label, kind, shots, delim, category, baseline) in enumerate(tasks):
            config += (f"- label: {label}\n  dataset_uri: {category}/{label}.jsonl\n  num_fewshot: [{shots}]\n"
                       f"  icl_task_type: {(kind_of or {}).get(label, kind)}\n"
                       f"  continuation_delimiter: {json.dumps(delim)}\n")
            meta += f"{label},{category},{kind},{shots},{n},{baseline},,a stand-in\n"
            lines = [json.dumps(item) for item in make_items(kind, n, seed=i, lead=" " if delim == "" else "")]
            if label == bad_line:
                lines[3] = lines[3][:-5]
            if label != drop:
                z.writestr(f"eval_bundle/eval_data/{category}/{label}.jsonl", "\n".join(lines) + "\n")
        z.writestr("eval_bundle/core.yaml", config)
        z.writestr("eval_bundle/eval_meta_data.csv", meta)
    return str(path)
