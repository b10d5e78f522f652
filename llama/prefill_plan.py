"""Which prompt chunks share one prefill forward call: rows of one padded width, chosen to compute as many real
tokens as the call's budget allows.

A call's cost grows with rows x padded width (padding is computed too), so the budget bounds that area rather than
the real tokens. Plain Python over lengths, so that every rank under torchrun makes the same plan.
"""


def plan_prefill(pending: list[tuple[int, int]], area: int, max_seq_len: int) -> tuple[list[tuple[int, int]], int]:
    """One forward call's rows: `pending` holds each prompt's (start, remaining tokens), in admission order; the
    result is [(index into pending, tokens to prefill)] and the padded width, with rows x width <= `area`.

    The first prompt always takes part (first come, first served), then those that fill the most of the width.
    Longer prompts are cut into chunks of the width (chunking costs nothing), shorter ones padded up to it; the
    width is the one that prefills the most real tokens, which keeps padding small: a row much shorter than the
    width would waste the area it takes, so it waits for a call of rows like it. A row joins only if its padding
    stays within the context (start + width <= max_seq_len).
    """
    if not pending or area < 1:
        raise ValueError(f"plan_prefill needs prompts to prefill and an area >= 1, got {len(pending)} and {area}")
    room = max_seq_len - pending[0][0]  # the first row's padding must stay within the context too
    widths = {min(remaining, area) for _, remaining in pending} | {area // rows for rows in range(1, len(pending) + 1)}
    best: tuple[tuple[int, int, int], list[tuple[int, int]], int] = ((0, 0, 0), [], 0)
    for width in (w for w in widths if 1 <= w <= room):
        # With the first prompt, those that fill the most of the width (in order of admission on a tie).
        fitting = [i for i, (start, _) in enumerate(pending) if i > 0 and start + width <= max_seq_len]
        others = sorted(fitting, key=lambda i: -min(pending[i][1], width))[: area // width - 1]
        rows = [(i, min(pending[i][1], width)) for i in [0, *sorted(others)]]
        # The most real tokens; then the least padding; then the wider (fewer rows, more of them complete).
        score = (sum(size for _, size in rows), -len(rows) * width, width)
        if score > best[0]:
            best = (score, rows, width)
    return best[1], best[2]
