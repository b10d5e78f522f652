"""The generation benchmark's report: the markdown table (one row per implementation, plus ratios to
transformers), the notes under it, and an optional PNG bar chart."""

from datetime import date
from pathlib import Path
from typing import Any

import torch

from safetensors_writer import ALIGNMENT

GIB = 1024**3


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for the table, or a dash when it was not measured."""
    return "–" if value is None else f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    """a / b as "1.23×", or a dash."""
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def memory_label(config: dict[str, Any]) -> str:
    """What the memory columns measure: GPU allocations on a GPU, the process's peak RSS on the CPU."""
    return "peak GPU memory" if config["device"] == "cuda" else "peak RSS"


def markdown_report(config: dict[str, Any], results: dict[str, dict[str, Any]], machine: dict[str, Any]) -> str:
    """The markdown table (one row per implementation, plus ratios to transformers) and the notes under it."""
    notes = [""] + limit_notes(config, results, machine) + agreement_notes(config, machine) + footer(config, machine)
    return "\n".join(markdown_table(config, results) + notes)


def markdown_table(config: dict[str, Any], results: dict[str, dict[str, Any]]) -> list[str]:
    """The table's lines: a row per implementation, then each one's ratios to transformers."""
    batches = config["batch_sizes"]
    p = config["prompt_len"]
    header = ["", "load s", f"prefill {p} tok/s (last logits)", f"prefill {p} tok/s (all logits)"]
    header += [f"decode batch {b} tok/s" + (" (total)" if b > 1 else "") for b in batches]
    memory = memory_label(config)
    header += [f"{memory} GiB", "weights + KV GiB", f"{memory} / (weights + KV)"]

    def metrics(result: dict[str, Any]) -> list[float | None]:
        return ([result["load_s"], result["prefill_last_tok_s"], result["prefill_all_tok_s"]]
                + [result["decode_tok_s"].get(str(b)) for b in batches]
                + [result["peak_bytes"] / GIB, result["weights_kv_bytes"] / GIB,
                   result["peak_bytes"] / result["weights_kv_bytes"]])

    digits = [2, 1, 1] + [2] * len(batches) + [2, 2, 2]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result in results.items():
        lines.append(f"| {name} | " + " | ".join(fmt(v, d) for v, d in zip(metrics(result), digits)) + " |")
    baseline = results.get("transformers")
    if baseline is not None:
        for name, result in results.items():
            if name == "transformers":
                continue
            # Ratio > 1 is better for speeds; for load time and memory a ratio > 1 means ours takes more.
            cells = [ratio(a, b) for a, b in zip(metrics(result), metrics(baseline))]
            cells[-1] = "–"
            lines.append(f"| {name} / transformers | " + " | ".join(cells) + " |")
    return lines


def limit_notes(config: dict[str, Any], results: dict[str, dict[str, Any]], machine: dict[str, Any]) -> list[str]:
    """The batch-1 decode limit that the read bandwidth implies, each implementation's share of it, and warnings
    about misaligned weights."""
    limit = machine["bandwidth_bytes_s"] / machine["decode_bytes_per_token"]
    notes = [
        f"Read bandwidth {machine['bandwidth_bytes_s'] / 1e9:.1f} GB/s; a decode step reads "
        f"{machine['decode_bytes_per_token'] / 1e9:.2f} GB of {config['dtype']} weights (all but the embedding), "
        f"so batch-1 decode is limited to about {limit:.1f} tok/s.",
    ]
    for name, result in results.items():
        batch1 = result["decode_tok_s"].get("1")
        if batch1 is not None:
            notes.append(f"- {name}: batch-1 decode at {100 * batch1 / limit:.0f} % of that limit.")
    for name, result in results.items():
        if result.get("misaligned_weights"):
            notes.append(f"- warning: {result['misaligned_weights']} of {name}'s weights are not {ALIGNMENT}-byte "
                         "aligned in memory, which can make its matmuls slower.")
    return notes


def agreement_notes(config: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    """Greedy-token agreement with transformers, and the quantized and rounding quality figures, where measured."""
    notes = []
    greedy = machine.get("greedy")
    if greedy is not None:
        same, total = greedy["same"], greedy["total"]
        notes.append(f"\nGreedy tokens, ours vs transformers: {same}/{total} identical"
                     + (" (float32: required to be all)" if config["dtype"] == "float32" else
                        f" ({config['dtype']}: rounding may flip near-ties, so reported only)") + ".")
    for name, quality in machine.get("quality", {}).items():
        notes.append(f"Quantized ({name}) vs unquantized ours over {quality['positions']} positions: "
                     f"top-1 agreement {100 * quality['top1_agreement']:.1f} %, mean KL {quality['kl']:.4f} nats.")
    rounding = machine.get("rounding_quality")
    if rounding is not None:
        notes.append(f"For scale, ours in {config['dtype']} vs ours in float32 (same weights, same positions): top-1 "
                     f"agreement {100 * rounding['top1_agreement']:.1f} %, mean KL {rounding['kl']:.4f} nats.")
    return notes


def footer(config: dict[str, Any], machine: dict[str, Any]) -> list[str]:
    """How to read the ratios, and what was run where."""
    rounds = f" in each of {config['rounds']} rounds, then the median over the rounds" if config["rounds"] > 1 else ""
    return [
        f"\nRatios above 1× favour ours for speeds; for load time and {memory_label(config)}, below 1× does.",
        f"\n{config['preset']} preset ({machine['n_params'] / 1e9:.2f} B parameters, random weights), "
        f"{config['dtype']}, {machine['where']}, prompt {config['prompt_len']} tokens for prefill and "
        f"{config['decode_prompt_len']} before decoding {config['decode_tokens']} tokens, median of "
        f"{config['repeats']}{rounds}; {date.today().isoformat()}, torch {torch.__version__}, "
        f"transformers {machine.get('transformers_version', '–')}.",
    ]


def write_chart(path: Path, config: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    """A grouped bar chart of the throughput figures (tokens/s), one bar per implementation."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    labels = [f"prefill {config['prompt_len']}\n(last logits)"]
    labels += [f"decode\nbatch {b}" for b in config["batch_sizes"]]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(2 + 1.8 * len(labels), 4))
    for index, (name, result) in enumerate(results.items()):
        values = [result["prefill_last_tok_s"]] + [result["decode_tok_s"][str(b)] for b in config["batch_sizes"]]
        positions = [i + (index - (len(results) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(positions, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yscale("log")  # prefill and decode differ by two orders of magnitude
    ax.set_ylabel("tokens/s (log scale)")
    ax.set_title(f"{config['preset']} {config['dtype']}, {config['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
