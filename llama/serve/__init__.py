"""An OpenAI-compatible HTTP server: `python -m llama.serve --ckpt_dir DIR` (see llama/serve/__main__.py)."""
