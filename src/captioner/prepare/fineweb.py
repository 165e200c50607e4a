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
import gzip
import itertools
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from captioner.data.shards import shard_path, split_of
from captioner.errors import UserError, from_hub
from captioner.io import save_json, save_npy
from captioner.tokenizer import EOT, gpt2_encoding

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
Texts = Sequence[str] | pa.Array  # a batch of documents
DOCS_PER_BATCH = 64  # one task for a tokeniser process: ~130k tokens of FineWeb-Edu, tens of milliseconds


def encode(text: str) -> np.ndarray:
    """One document's GPT-2 token ids, special-token text encoded as ordinary text (`encode_ordinary`)."""
    enc = gpt2_encoding()
    try:  # the numpy variant (tiktoken >= 0.9) skips building a Python int per token
        return enc.encode_to_numpy(text, disallowed_special=())
    except (UnicodeEncodeError, AttributeError):  # lone surrogates (its fallback is there), or tiktoken < 0.9
        return np.array(enc.encode_ordinary(text), dtype=np.uint32)


def tokenize_batch(texts: Texts) -> tuple[np.ndarray, np.ndarray]:
    """Documents → their [EOT, *tokens] back to back as uint16, shape (N,), and each one's length, shape (D,)."""
    if isinstance(texts, pa.Array):  # Arrow strings cross to a worker as one buffer and become str there
        texts = texts.to_pylist()
    ids = [encode(t) for t in texts]
    lengths = np.array([len(a) + 1 for a in ids], dtype=np.int64)
    tokens = np.empty(int(lengths.sum()), dtype=np.uint16)
    pos = 0
    for a in ids:
        tokens[pos] = EOT
        tokens[pos + 1 : pos + 1 + len(a)] = a  # GPT-2 ids are < 2**16, so the cast to uint16 is exact
        pos += len(a) + 1
    return tokens, lengths


def _texts(rows: Sequence[dict], text_key: str, first: int, source: str) -> list[str]:
    """The `text_key` field of rows `first`, `first + 1`, ... of source, or a KeyError naming the row without it."""
    for i, row in enumerate(rows):
        if text_key not in row:
            raise UserError(
                f"document {first + i} of {source} has no {text_key!r} field (it has {sorted(row)})"
            )
    return [row[text_key] for row in rows]


def hub_commit(dataset: str, revision: str) -> str:
    """The commit that `revision` (a branch, tag or commit of hub dataset `dataset`) points at now."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(dataset, revision=revision).sha
    except OSError as err:  # offline, no such dataset or revision
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"dataset={dataset!r} revision={revision!r}: cannot resolve it on the hub ({first})"
        ) from err


def _recorded_revision(manifest: Path) -> str | None:
    """The hub commit an earlier run into this manifest read, if it says (an unreadable one is reported later)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return json.loads(manifest.read_text()).get("settings", {}).get("revision")
    return None


def _hub_batches(dataset: str, name: str | None, text_key: str, revision: str) -> Iterator[pa.Array]:
    from datasets import load_dataset  # heavy (streaming also imports torch); only needed here

    stream = from_hub(
        lambda d: load_dataset(d, name=name, split="train", streaming=True, revision=revision),
        dataset,
        "dataset",
    )
    rows = stream.with_format("arrow")
    for batch in rows.iter(DOCS_PER_BATCH):
        if text_key not in batch.column_names:
            raise UserError(
                f"{dataset} ({name}) has no {text_key!r} field (it has {sorted(batch.column_names)})"
            )
        yield batch[text_key].combine_chunks()


def _parquet_batches(path: Path, text_key: str) -> Iterator[pa.Array]:
    file = pq.ParquetFile(path)
    if text_key not in file.schema_arrow.names:
        raise UserError(f"{path} has no {text_key!r} field (it has {sorted(file.schema_arrow.names)})")
    for batch in file.iter_batches(batch_size=DOCS_PER_BATCH, columns=[text_key]):
        yield batch.column(0)


def _json_batches(path: Path, text_key: str) -> Iterator[list[str]]:
    """JSON Lines, or one JSON array of records (what `datasets`' json loader reads), optionally gzipped."""
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        head = f.readline()
        if head.lstrip().startswith("["):
            rows = iter(json.loads(head + f.read()))
        else:
            rows = (json.loads(line) for line in itertools.chain([head], f) if line.strip())
        for first in itertools.count(0, DOCS_PER_BATCH):
            if not (batch := list(itertools.islice(rows, DOCS_PER_BATCH))):
                return
            yield _texts(batch, text_key, first, str(path))


def _local_batches(files: Sequence[Path], text_key: str) -> Iterator[Texts]:
    for f in files:  # every name is checked before the first document is read
        if not f.is_file():
            raise UserError(f"input file {f} does not exist")
        if not f.name.endswith((".parquet", *JSON_SUFFIXES)):
            raise UserError(f"{f}: expected a .parquet, .jsonl, .json, .jsonl.gz or .json.gz file")
    for f in files:
        yield from (_parquet_batches if f.name.endswith(".parquet") else _json_batches)(f, text_key)


def text_batches(
    files: Sequence[Path] | None,
    dataset: str,
    name: str | None,
    text_key: str,
    start: int,
    stop: int | None,
    revision: str | None = None,
) -> Iterator[Texts]:
    """Stream the text of documents [start, stop) in order, in batches, from local files or the hub dataset
    (at commit `revision`).

    Local files are read with pyarrow / json directly: `datasets` takes seconds to import, more than
    tokenising a small corpus.
    """
    seen = 0
    source = _local_batches(files, text_key) if files else _hub_batches(dataset, name, text_key, revision)
    for texts in source:
        lo, hi = max(start - seen, 0), len(texts) if stop is None else min(len(texts), stop - seen)
        seen += len(texts)
        if lo < hi:
            yield texts[lo:hi]
        if stop is not None and seen >= stop:
            return


class TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.speed
        return Text("? tok/s" if speed is None else f"{speed / 1e6:.2f}M tok/s", style="progress.data.speed")


@contextlib.contextmanager
def _token_stream(
    num_proc: int,
) -> Iterator[Callable[[Iterable[Texts]], Iterator[tuple[np.ndarray, np.ndarray]]]]:
    """An ordered map of `tokenize_batch` over batches of documents: a process pool, or in-process for num_proc=1."""
    if num_proc == 1:
        yield lambda batches: map(tokenize_batch, batches)
        return
    gpt2_encoding()  # loaded once here, inherited by the forked workers
    with multiprocessing.Pool(num_proc) as pool:
        yield lambda batches: pool.imap(tokenize_batch, batches)


def _read_manifest(path: Path, settings: dict) -> dict:
    fresh = {"settings": settings, "shards": [], "docs_done": 0, "carry": 0, "complete": False}
    if not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
        saved = state["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path}: unreadable manifest ({err}); delete it to start over") from err
    for key, value in settings.items():
        if saved.get(key) != value:
            raise UserError(
                f"{path}: these shards were made with {key}={saved.get(key)!r}, now {key}={value!r}; "
                "use another output directory or prefix, or delete the manifest and shards to start over"
            )
    return state


def _write_if_changed(path: Path, tokens: np.ndarray) -> None:
    """Write a shard unless an identical one is already there (a run whose manifest update was lost)."""
    if path.exists():
        with contextlib.suppress(ValueError, OSError, EOFError):
            old = np.load(path, mmap_mode="r")
            if old.dtype == np.uint16 and np.array_equal(old, tokens):
                return
    save_npy(path, tokens)


def prepare_fineweb(
    out_dir: str | Path,
    *,
    files: Sequence[str | Path] | None = None,
    dataset: str = "HuggingFaceFW/fineweb-edu",
    name: str | None = "sample-10BT",
    revision: str | None = None,
    shard_size: int = 100_000_000,
    prefix: str = "edufineweb",
    num_proc: int | None = None,
    max_docs: int | None = None,
    text_key: str = "text",
) -> list[Path]:
    """Tokenise a document stream into `<prefix>_{val,train}_NNNNNN.npy` shards in out_dir; return their paths.

    files: local .parquet / .jsonl / .json / .json(l).gz files read instead of the hub `dataset` / `name`.
    revision: a branch, tag or commit of the hub dataset (the card lists versions). The commit it points at is
    recorded in the manifest and an unfinished run resumes from that commit only; without `revision`, a resume
    takes the recorded commit, a fresh run main's.
    max_docs: stop after this many documents (a quick partial build). num_proc: tokeniser processes (all cores).
    """
    out_dir = Path(out_dir)
    files = [Path(f) for f in files] if files else None
    if shard_size < 2:
        raise UserError(f"shard_size must be >= 2 tokens, got {shard_size}")
    manifest = out_dir / f"{prefix}_manifest.json"
    if files:
        commit = None
    elif revision is None and (recorded := _recorded_revision(manifest)):
        commit = recorded
    else:
        commit = hub_commit(dataset, revision or "main")
    settings = {
        "source": [str(f.resolve()) for f in files] if files else f"{dataset}/{name}",
        "revision": commit,
        "text_key": text_key,
        "max_docs": max_docs,
        "shard_size": shard_size,
    }
    state = _read_manifest(manifest, settings)
    console = Console(stderr=True)
    if state["complete"]:
        console.print(f"{len(state['shards'])} shard(s) already prepared in {out_dir} ({manifest.name})")
        return [out_dir / n for n in state["shards"]]
    if state["shards"]:
        console.print(f"resuming after {len(state['shards'])} shard(s), {state['docs_done']:,} documents")

    def finish_shard(tokens: np.ndarray, docs_done: int, carry: int) -> None:
        index = len(state["shards"])
        path = shard_path(out_dir, prefix, split_of(index), index)
        _write_if_changed(path, tokens)
        state["shards"].append(path.name)
        state.update(docs_done=docs_done, carry=carry)
        save_json(manifest, state, indent=1)
        console.print(f"wrote {path} ({len(tokens):,} tokens)")

    buf = np.empty(shard_size, dtype=np.uint16)
    fill = 0
    docs_done, carry = state["docs_done"], state["carry"]
    stop = None if max_docs is None else max(max_docs, docs_done)
    batches = text_batches(files, dataset, name, text_key, docs_done, stop, revision=commit)
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
        for tokens, lengths in tokenize_all(batches):
            # on resume, the first document's first `carry` tokens are already in the last finished shard
            pos, carry = carry, 0
            if pos >= lengths[0]:
                raise UserError(
                    f"{manifest}: document {docs_done} is shorter than the manifest says; the source changed "
                    "since the last run; delete the manifest and shards to start over"
                )
            ends = np.cumsum(lengths)  # where each document ends in `tokens`
            progress.advance(task, len(tokens) - pos)
            while pos < len(tokens):
                take = min(shard_size - fill, len(tokens) - pos)
                buf[fill : fill + take] = tokens[pos : pos + take]
                fill, pos = fill + take, pos + take
                if fill == shard_size:
                    done = int(np.searchsorted(ends, pos, side="right"))  # documents of this batch written
                    finish_shard(buf, docs_done + done, pos - (int(ends[done - 1]) if done else 0))
                    fill = 0
            docs_done += len(lengths)
        if fill >= 2:
            finish_shard(buf[:fill], docs_done, 0)
        elif fill:  # a 1-token shard holds no (x, y) pair and readers reject it
            console.print(f"dropped the last token (token id {buf[0]}): too short for a shard of its own")
    if not state["shards"]:
        raise UserError(f"no documents in {settings['source']}; nothing written to {out_dir}")
    state["complete"] = True
    save_json(manifest, state, indent=1)
    return [out_dir / n for n in state["shards"]]
