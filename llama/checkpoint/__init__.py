"""Checkpoints in Meta's layout: a folder with `params.json`, `tokenizer.model` and `consolidated.00.pth` ..
`consolidated.{K-1:02d}.pth`, one plain dict of tensors per model-parallel rank.

- `layout`: the full shape of every tensor and how the shards split it (also what `llama.parallel` shards by);
- `load`: what `Llama.build` uses at run time (reading and checking a folder, loading this process's share);
- `write`: the one writer every command below uses (atomic output folder, checklist);
- `random_weights`, `reshard`, `hf`: the commands of `python -m llama.checkpoint` (see `__main__`).
"""
