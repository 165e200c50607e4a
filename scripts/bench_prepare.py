"""Benchmark (not a test): `captioner-prepare fineweb` vs build-nanogpt's own fineweb.py on one local corpus.

    git -C <build-nanogpt clone> show HEAD:fineweb.py > /tmp/bng/fineweb.py
    python scripts/bench_prepare.py --bng /tmp/bng/fineweb.py                 # ~2.3k docs, ~4.6M tokens
    python scripts/bench_prepare.py --bng /tmp/bng/fineweb.py --full          # ~9k docs, ~18M tokens
    python scripts/bench_prepare.py --bng /tmp/bng/fineweb.py --format jsonl  # or --files my.parquet

Both tools run as fresh subprocesses (interpreter start and imports count), alternately, `--repeat` times each,
at each process count in `--procs` (default: 1 and all cores), after one untimed warm-up each (which also lets
`datasets` build its Arrow cache for build-nanogpt's non-streaming `load_dataset`). build-nanogpt's script runs
unmodified from the given path; a `sitecustomize` shim in its subprocess only points `load_dataset` at the local
files, sets its `shard_size` and output directory, makes `os.cpu_count() // 2` the process count under test and
gives tiktoken the local GPT-2 BPE (offline). Every run's shards must be byte-identical to build-nanogpt's.

Printed: wall seconds and CPU seconds (the process and its workers) as median (min–max) over the rounds, and
the speed ratio ours/bng per round (each round runs both back to back, so a busy neighbour skews both alike).

The corpus is synthetic English-like text (Zipf-distributed common words and invented longer words, sentences,
paragraphs, numbers), about 2,000 GPT-2 tokens a document like FineWeb-Edu's. The CPU may be shared: the load
average is printed with the results, and CPU seconds move less with it than wall seconds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json
import pyarrow.parquet as pq

# the most frequent English words, most frequent first, and syllables for invented longer words
COMMON_WORDS = """the of and to a in is that for it as was with be by on not he I this are or his from at which but
have an they you were her she there one all we their been has when who will more no if out so said what up its
about into than them can only other new some could time these two may then do first any my now such like our
over man me even most made after also did many before must through back years where much your way well down
should because each just those people how too little state good very make world still own see men work long get
here between both life being under never day same another know while last might us great old year off come
since against go came right used take three"""
SYLLABLES = [c + v for c in "bcdfglmnprstvz" for v in "aeiou"] + [
    "ex",
    "in",
    "con",
    "pro",
    "tion",
    "ment",
    "ness",
    "able",
    "ing",
    "ed",
    "er",
    "al",
    "ous",
    "ive",
]
SHIM = '''\
"""Runs build-nanogpt's fineweb.py offline on local files (bench_prepare.py); its source is not changed."""
import os
import sys

import datasets
import tiktoken

from captioner.tokenizer import gpt2_encoding

_procs = int(os.environ["BENCH_BNG_PROCS"])
os.cpu_count = lambda: 2 * _procs  # fineweb.py uses cpu_count() // 2 processes
tiktoken.get_encoding = lambda name: gpt2_encoding()  # the same GPT-2 BPE, from the local file
_load_dataset = datasets.load_dataset


def _local_load_dataset(*args, **kwargs):
    script = sys._getframe(1).f_globals  # fineweb.py's globals, assigned before load_dataset, read after
    script["shard_size"] = int(os.environ["BENCH_BNG_SHARD_SIZE"])
    script["DATA_CACHE_DIR"] = os.environ["BENCH_BNG_OUT"]
    files = os.environ["BENCH_BNG_FILES"].split(os.pathsep)
    return _load_dataset("parquet" if files[0].endswith(".parquet") else "json", data_files=files, split="train")


datasets.load_dataset = _local_load_dataset
'''


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """English-like documents of ~1,500 words (lognormal lengths), Zipf word frequencies."""
    rng = np.random.default_rng(seed)
    invented = {"".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(3000)}
    common = COMMON_WORDS.split()
    words = np.array(common + sorted(invented - set(common)), dtype=object)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.2
    p /= p.sum()
    docs = []
    for n in np.clip(rng.lognormal(7.1, 0.6, size=n_docs), 30, 20_000).astype(int):
        doc = words[rng.choice(len(words), size=n, p=p)]
        ends = np.cumsum(rng.integers(6, 28, size=n // 6 + 1))
        ends = ends[ends < n]
        for i in np.concatenate([[0], ends]):
            doc[i] = doc[i].capitalize()
        for i in ends - 1:
            doc[i] += rng.choice([".", ".", ".", "?", "!", ";"]) + ("\n\n" if rng.random() < 0.15 else "")
        for i in rng.choice(n, size=n // 40):
            doc[i] += rng.choice(
                [",", ",", " (" + str(rng.integers(1, 2030)) + ")", f" {rng.random() * 100:.1f}%"]
            )
        docs.append(" ".join(doc).replace("\n\n ", "\n\n") + ".")
    return docs


def write_corpus(docs: list[str], path: Path) -> None:
    table = pa.table({"text": docs, "id": [f"<urn:uuid:{i:08d}>" for i in range(len(docs))]})
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    else:
        import json

        path.write_text("".join(json.dumps(row) + "\n" for row in table.to_pylist()))


def run_ours(files: list[Path], out: Path, shard_size: int, procs: int) -> tuple[float, float]:
    cli = Path(sys.executable).parent / "captioner-prepare"
    cmd = [str(cli), "fineweb", "--files", *map(str, files), "--out", str(out)]
    return _timed([*cmd, "--shard-size", str(shard_size), "--num-proc", str(procs)], {})


def run_bng(
    bng: Path, shim: Path, files: list[Path], out: Path, shard_size: int, procs: int
) -> tuple[float, float]:
    out.mkdir(parents=True)  # fineweb.py only creates its own default directory
    env = {
        "PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")]),
        "BENCH_BNG_PROCS": str(procs),
        "BENCH_BNG_SHARD_SIZE": str(shard_size),
        "BENCH_BNG_OUT": str(out),
        "BENCH_BNG_FILES": os.pathsep.join(map(str, files)),
    }
    return _timed([sys.executable, str(bng)], env)


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Run cmd; return its wall seconds and the CPU seconds it and its child processes used."""
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, cpu.ru_utime + cpu.ru_stime - cpu0.ru_utime - cpu0.ru_stime


def same_shards(ours: Path, bng: Path) -> int:
    """The number of shards, after checking both directories hold the same `.npy` files byte for byte."""
    names = sorted(p.name for p in bng.glob("*.npy"))
    if names != sorted(p.name for p in ours.glob("*.npy")):
        raise AssertionError(f"shard names differ: {ours} vs {bng}")
    for name in names:
        if (ours / name).read_bytes() != (bng / name).read_bytes():
            raise AssertionError(f"{name} differs between {ours} and {bng}")
    return len(names)


def span(values: list[float], unit: str = " s") -> str:
    return f"{statistics.median(values):6.2f}{unit} ({min(values):.2f}–{max(values):.2f})"


def ratio(bng: list[float], ours: list[float], paired: bool = True) -> str:
    """Speed ours/bng (bng time / our time): median and range over the rounds (each ran both, back to back),
    or, unpaired, the ratio of medians and the range over every pair of runs."""
    if paired:
        return span([b / o for b, o in zip(bng, ours, strict=True)], "x")
    pairs = [b / o for b in bng for o in ours]
    return f"{statistics.median(bng) / statistics.median(ours):6.2f}x ({min(pairs):.2f}–{max(pairs):.2f})"


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bng", type=Path, required=True, help="build-nanogpt's fineweb.py, run unmodified")
    parser.add_argument("--files", type=Path, nargs="+", help="a local corpus instead of the synthetic one")
    parser.add_argument("--full", action="store_true", help="synthetic corpus of 9,031 docs (default 2,258)")
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    parser.add_argument("--shard-size", type=int, default=1_000_000)
    parser.add_argument("--procs", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        tmp = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf_cache")  # build-nanogpt's Arrow cache, not kept
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        (tmp / "shim").mkdir()
        (tmp / "shim" / "sitecustomize.py").write_text(SHIM)
        files = args.files
        if not files:
            t0 = time.perf_counter()
            docs = make_corpus(9031 if args.full else 2258)
            files = [tmp / f"docs.{args.format}"]
            write_corpus(docs, files[0])
            mb = files[0].stat().st_size / 1e6
            seconds = time.perf_counter() - t0
            print(
                f"corpus: {len(docs):,} synthetic docs, {mb:.1f} MB {args.format} (made in {seconds:.1f} s)"
            )
        runs = {
            "bng": lambda out, n: run_bng(args.bng.resolve(), tmp / "shim", files, out, args.shard_size, n),
            "ours": lambda out, n: run_ours(files, out, args.shard_size, n),
        }
        print(f"CPU: {os.cpu_count()} threads; {load_average()} before the runs")
        labels = {"bng": "build-nanogpt fineweb.py", "ours": "captioner-prepare fineweb"}
        wall = {}
        for n in args.procs:
            wall[n], cpu = {side: [] for side in runs}, {side: [] for side in runs}
            for i in range(args.repeat + 1):  # round 0 is the warm-up
                for side, run in runs.items():
                    out = tmp / f"{side}_{n}_{i}"
                    seconds, cpu_seconds = run(out, n)
                    n_shards = same_shards(out, tmp / f"bng_{n}_0")
                    if i:
                        wall[n][side].append(seconds)
                        cpu[side].append(cpu_seconds)
            tokens = sum(np.load(p, mmap_mode="r").size for p in (tmp / f"bng_{n}_0").glob("*.npy"))
            print(
                f"{n} process(es): {tokens:,} tokens, {n_shards} shards, byte-identical in every run; {load_average()}"
            )
            print(f"  {'':26s} {'wall, median (min–max)':26s} CPU s, median (min–max)")
            for side, label in labels.items():
                print(f"  {label:26s} {span(wall[n][side]):26s} {span(cpu[side])}")
            print(
                f"  {'speed ratio ours/bng':26s} {ratio(wall[n]['bng'], wall[n]['ours']):26s} {ratio(cpu['bng'], cpu['ours'])}"
            )
        most, default = max(args.procs), max(1, (os.cpu_count() or 1) // 2)
        if default in wall and most != default:
            speed = ratio(wall[default]["bng"], wall[most]["ours"], paired=False)
            print(f"ours with {most} processes vs build-nanogpt with its default {default}: {speed} (wall)")


if __name__ == "__main__":
    main()
