"""HellaSwag data: load the jsonl with validation, render examples to tokens (build-nanogpt's way).

Each line of `hellaswag_{split}.jsonl` is one multiple-choice example:
`{"ctx": "A man is sitting on a roof. he", "endings": [4 strings], "label": 3, ...}`; other keys are ignored.
The embedded shapes world writes the same format, so both go through `load_examples`.
"""

from __future__ import annotations

import json
from pathlib import Path

from captioner.errors import UserError

N_ENDINGS = 4


def _validate(example, where: str) -> dict:
    """Check one parsed line; `where` is "file:line" for the error message."""
    if not isinstance(example, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(example).__name__}")
    for key in ("ctx", "label", "endings"):
        if key not in example:
            raise UserError(f"{where}: missing key {key!r}")
    if not isinstance(example["ctx"], str):
        raise UserError(f"{where}: key 'ctx' must be a string, got {type(example['ctx']).__name__}")
    endings = example["endings"]
    if not (
        isinstance(endings, list) and len(endings) == N_ENDINGS and all(isinstance(e, str) for e in endings)
    ):
        raise UserError(f"{where}: key 'endings' must be a list of {N_ENDINGS} strings, got {endings!r}")
    label = example["label"]
    # The Hugging Face copy of HellaSwag stores labels as strings ("0".."3"); accept both spellings.
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise UserError(f"{where}: key 'label' must be an integer in 0..{N_ENDINGS - 1}, got {label!r}")
    return {**example, "label": label}


def load_examples(path: str | Path, limit: int | None = None) -> list[dict]:
    """Read and validate up to `limit` examples from a HellaSwag-format jsonl file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"HellaSwag file not found: {path} (run `captioner-prepare hellaswag`)")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            examples.append(_validate(example, f"{path}:{lineno}"))
    if not examples:
        raise UserError(f"{path}: no examples")
    return examples


def render_example(example: dict, enc) -> tuple[list[list[int]], list[int]]:
    """Tokenise one example into 4 candidate rows, build-nanogpt style.

    Row i is `enc(ctx) + enc(" " + endings[i])` (the space because GPT-2's BPE attaches it to the next word);
    `starts[i]` is the index of row i's first ending token. Only tokens at positions >= starts[i] count
    towards that ending's loss.
    """
    ctx_tokens = enc.encode(example["ctx"])
    rows = [ctx_tokens + enc.encode(" " + ending) for ending in example["endings"]]
    return rows, [len(ctx_tokens)] * len(rows)
