"""Documents as MUSE's baselines train on them: joined into one text and cut into fixed windows.

MUSE (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models"; code
github.com/swj0419/muse_bench, commit fcd6651) does not train on documents one by one:

- ``load_data.py`` writes each ``raw`` split as one text file, its documents joined by a blank
  line (``"\\n\\n"``), nothing before the first or after the last;
- ``baselines/baselines/dataset.py`` (``DefaultDataset``, the ``.txt`` branch that
  ``baselines/unlearn.py`` reaches for both the forget and the retain file, News and Books alike)
  tokenizes that whole text once **without** special tokens and cuts it into consecutive windows
  of ``max_len - 1`` tokens, each led by the tokenizer's BOS (``add_bos_token=True``, its
  default), so every row is ``max_len`` tokens and every token of the text is in a row;
- the last window, if short, is filled up to ``max_len`` with the start of the first window (its
  BOS included: MUSE "rotates" rather than pads), so those at most ``max_len - 1`` tokens are
  trained on twice per epoch and no row is padded; the row count is ceil(n / (max_len - 1)) for n
  tokens;
- every token is a label (its collator sets ``labels`` to ``input_ids``).

``window_rows`` does the same. A tokenizer without a BOS token gets MUSE's ``add_bos_token=False``
branch: windows of ``max_len`` tokens, ceil(n / max_len) rows.
"""

from __future__ import annotations

from lightning_unlearn.errors import ConfigError, UserError

DOCUMENT_SEPARATOR = "\n\n"


def window_rows(texts: list[str], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """``texts`` joined by a blank line, tokenized once without special tokens and cut into
    consecutive ``max_length``-token rows (BOS first when the tokenizer has one), the last filled
    with the start of the first; every token a label."""
    text = DOCUMENT_SEPARATOR.join(texts)
    # verbose=False: a whole book is longer than the model's context, which is the point here.
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if not ids:
        raise UserError("the corpus holds no text to cut into windows")
    bos = tokenizer.bos_token_id
    lead = [] if bos is None else [bos]
    step = max_length - len(lead)
    if step < 1:
        raise ConfigError(f"data.max_length must be at least 2 to cut windows led by BOS, got {max_length}")
    windows = [lead + ids[start : start + step] for start in range(0, len(ids), step)]
    windows[-1] = (windows[-1] + windows[0])[:max_length]
    return [{"input_ids": window, "labels": list(window)} for window in windows]
