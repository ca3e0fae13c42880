"""
The machinery that serves the recipe in train_gpt2.py, which reads without opening any of it:

- checkpoints.py: what a run writes to --log_dir, when it saves (Checkpointer), and how it resumes
- speed.py: what only makes training faster (MFU, SDPA kernels, -B auto, prefetching, chunked loss)
- hf_convert.py: weights to and from transformers
- runtime.py: devices, and ranks that stop together
- pretokenized.py: fineweb.py --pretokenized, GPT-2 token shards downloaded from the hub
- common.py: the one-line error, flags, safe writes, downloads, locks, the tokenizer (no torch)

Only imported: every command a user runs is a script at the repo's top level.
"""
