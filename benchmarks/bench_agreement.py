"""How closely two runs agree: greedy tokens of ours against transformers, and the quality loss (top-1 agreement,
KL divergence) between two sets of logits, including ours in float32 as the reference for the run dtype's
rounding."""

from pathlib import Path
from typing import Any

import torch


def compare_greedy(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[int, int]:
    """(positions where both picked the same token, positions compared), over every batch size's rows.

    Ours returns a row without its stop token and ends it there; transformers never stops, so its rows are
    compared up to our length, and where ours stopped early transformers must have picked a stop token.
    """
    same = total = 0
    stop_tokens = set(ours["stop_tokens"])
    for batch, our_rows in ours["greedy"].items():
        for our_row, their_row in zip(our_rows, theirs["greedy"][batch]):
            n = len(our_row)
            total += n
            same += sum(a == b for a, b in zip(our_row, their_row))
            if n < len(their_row):  # ours stopped: the next token must have been a stop token
                total += 1
                same += their_row[n] in stop_tokens
    return same, total


def quality_loss(reference_path: Path, quantized_path: Path) -> dict[str, float]:
    """Top-1 agreement and mean KL(reference || quantized) between two saved (positions, vocab) logit tensors."""
    reference = torch.load(reference_path).float()
    quantized = torch.load(quantized_path).float()
    top1 = (reference.argmax(-1) == quantized.argmax(-1)).float().mean().item()
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(quantized, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return {"top1_agreement": top1, "kl": kl, "positions": reference.shape[0]}


def float32_logits(meta_dir: Path, prompt: list[int], device: str) -> torch.Tensor:
    """Logits (positions, vocab) of ours in float32 over `prompt`: the reference for the run dtype's rounding."""
    from llama.generation import Llama

    llama = Llama.build(meta_dir, max_seq_len=len(prompt), max_batch_size=1, device=device, dtype=torch.float32)
    with torch.inference_mode():
        return llama.model(torch.tensor([prompt], device=device), 0)[0].cpu()
