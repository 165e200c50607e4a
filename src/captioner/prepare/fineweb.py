"""FineWeb-Edu (or local parquet/jsonl files) → uint16 GPT-2 token shards, as build-nanogpt's fineweb.py.

Documents are tokenised in a process pool, each prefixed with EOT, and packed back to back into shards of exactly
`shard_size` tokens (a document that does not fit spills into the next shard); shard 0 is "val", the rest
"train", and the last, partial shard is written too (unless it would hold a single token).

Resumable: after each shard a manifest `<prefix>_manifest.json` records the finished shards and how far into the
document stream they reach (documents done + tokens of the next document already written). A re-run streams the
source again but skips those documents without tokenising them; a finished run returns at once. Every file is
written atomically, so a shard on disk is whole.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from captioner.data.token_shards import load_shard, shard_path, write_shard
from captioner.io import save_json
from captioner.tokenizer import EOT, gpt2_encoding

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def tokenize(text: str) -> np.ndarray:
    """One document → [EOT, *tokens] as uint16, shape (n + 1,)."""
    return np.array([EOT, *gpt2_encoding().encode_ordinary(text)], dtype=np.uint16)


def _builder(files: Sequence[Path]) -> str:
    """The `datasets` packaged builder that reads these local files: "parquet" or "json"."""
    kinds = set()
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"input file {f} does not exist")
        if f.name.endswith(".parquet"):
            kinds.add("parquet")
        elif f.name.endswith(JSON_SUFFIXES):
            kinds.add("json")
        else:
            raise ValueError(f"{f}: expected a .parquet, .jsonl, .json, .jsonl.gz or .json.gz file")
    if len(kinds) > 1:
        raise ValueError(
            f"mix of parquet and json inputs ({', '.join(map(str, files))}); pass one kind at a time"
        )
    return kinds.pop()


def documents(files: Sequence[Path] | None, dataset: str, name: str | None, text_key: str) -> Iterator[str]:
    """Stream the text of every document, in order, from the hub dataset or the local files."""
    from datasets import load_dataset  # heavy; only needed here

    if files:
        source = ", ".join(map(str, files))
        rows = load_dataset(
            _builder(files), data_files=[str(f) for f in files], split="train", streaming=True
        )
    else:
        source = f"{dataset} ({name})"
        rows = load_dataset(dataset, name=name, split="train", streaming=True)
    for i, row in enumerate(rows):
        if text_key not in row:
            raise KeyError(f"document {i} of {source} has no {text_key!r} field (it has {sorted(row)})")
        yield row[text_key]


class TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.speed
        return Text("? tok/s" if speed is None else f"{speed / 1e6:.2f}M tok/s", style="progress.data.speed")


@contextlib.contextmanager
def _token_stream(num_proc: int) -> Iterator[Callable[[Iterable[str]], Iterator[np.ndarray]]]:
    """An ordered map of `tokenize` over documents: a process pool, or in-process for num_proc=1."""
    if num_proc == 1:
        yield lambda docs: map(tokenize, docs)
        return
    with multiprocessing.Pool(num_proc) as pool:
        yield lambda docs: pool.imap(tokenize, docs, chunksize=16)


def _read_manifest(path: Path, settings: dict) -> dict:
    fresh = {"settings": settings, "shards": [], "docs_done": 0, "carry": 0, "complete": False}
    if not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
        saved = state["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable manifest ({err}); delete it to start over") from err
    for key, value in settings.items():
        if saved.get(key) != value:
            raise ValueError(
                f"{path}: these shards were made with {key}={saved.get(key)!r}, now {key}={value!r}; "
                "use another output directory or prefix, or delete the manifest and shards to start over"
            )
    return state


def _write_if_changed(path: Path, tokens: np.ndarray) -> None:
    """Write a shard unless an identical one is already there (a run whose manifest update was lost)."""
    if path.exists():
        with contextlib.suppress(ValueError):
            if np.array_equal(load_shard(path), tokens):
                return
    write_shard(path, tokens)


def prepare_fineweb(
    out_dir: str | Path,
    *,
    files: Sequence[str | Path] | None = None,
    dataset: str = "HuggingFaceFW/fineweb-edu",
    name: str | None = "sample-10BT",
    shard_size: int = 100_000_000,
    prefix: str = "edufineweb",
    num_proc: int | None = None,
    max_docs: int | None = None,
    text_key: str = "text",
) -> list[Path]:
    """Tokenise a document stream into `<prefix>_{val,train}_NNNNNN.npy` shards in out_dir; return their paths.

    files: local .parquet / .jsonl / .json / .json(l).gz files read instead of the hub `dataset` / `name`.
    max_docs: stop after this many documents (a quick partial build). num_proc: tokeniser processes (all cores).
    """
    out_dir = Path(out_dir)
    files = [Path(f) for f in files] if files else None
    if shard_size < 2:
        raise ValueError(f"shard_size must be >= 2 tokens, got {shard_size}")
    settings = {
        "source": [str(f.resolve()) for f in files] if files else f"{dataset}/{name}",
        "text_key": text_key,
        "max_docs": max_docs,
        "shard_size": shard_size,
    }
    manifest = out_dir / f"{prefix}_manifest.json"
    state = _read_manifest(manifest, settings)
    console = Console(stderr=True)
    if state["complete"]:
        console.print(f"{len(state['shards'])} shard(s) already prepared in {out_dir} ({manifest.name})")
        return [out_dir / n for n in state["shards"]]
    if state["shards"]:
        console.print(f"resuming after {len(state['shards'])} shard(s), {state['docs_done']:,} documents")

    def finish_shard(tokens: np.ndarray, docs_done: int, carry: int) -> None:
        index = len(state["shards"])
        path = shard_path(out_dir, prefix, "val" if index == 0 else "train", index)
        _write_if_changed(path, tokens)
        state["shards"].append(path.name)
        state.update(docs_done=docs_done, carry=carry)
        save_json(manifest, state, indent=1)
        console.print(f"wrote {path} ({len(tokens):,} tokens)")

    buf = np.empty(shard_size, dtype=np.uint16)
    fill = 0
    docs_done, carry = state["docs_done"], state["carry"]
    stop = None if max_docs is None else max(max_docs, docs_done)
    texts = itertools.islice(documents(files, dataset, name, text_key), docs_done, stop)
    columns = (
        TextColumn("[bold]{task.description}"),
        TextColumn("{task.completed:,.0f} tokens"),
        TokensPerSecond(),
        TimeElapsedColumn(),
    )
    with (
        _token_stream(num_proc or os.cpu_count() or 1) as tokenize_all,
        Progress(*columns, console=console, disable=not console.is_terminal) as progress,
    ):
        task = progress.add_task(f"tokenising into {out_dir}", total=None)
        for tokens in tokenize_all(texts):
            # on resume, the first document's first `carry` tokens are already in the last finished shard
            start, carry = carry, 0
            if start >= len(tokens):
                raise ValueError(
                    f"{manifest}: document {docs_done} is shorter than the manifest says; the source changed "
                    "since the last run; delete the manifest and shards to start over"
                )
            pos = start
            while pos < len(tokens):
                take = min(shard_size - fill, len(tokens) - pos)
                buf[fill : fill + take] = tokens[pos : pos + take]
                fill, pos = fill + take, pos + take
                if fill == shard_size:
                    doc_done = pos == len(tokens)
                    finish_shard(buf, docs_done + doc_done, 0 if doc_done else pos)
                    fill = 0
            docs_done += 1
            progress.advance(task, len(tokens) - start)
        if fill >= 2:
            finish_shard(buf[:fill], docs_done, 0)
        elif fill:  # a 1-token shard holds no (x, y) pair and readers reject it
            console.print(f"dropped the last token (token id {buf[0]}): too short for a shard of its own")
    if not state["shards"]:
        raise ValueError(f"no documents in {settings['source']}; nothing written to {out_dir}")
    state["complete"] = True
    save_json(manifest, state, indent=1)
    return [out_dir / n for n in state["shards"]]
