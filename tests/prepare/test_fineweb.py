"""prepare_fineweb on local parquet / jsonl files (offline): exact packing, names, resume, errors."""

import functools
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import captioner.prepare.fineweb as fineweb
from captioner.data.token_shards import load_shard
from captioner.prepare.fineweb import prepare_fineweb
from captioner.tokenizer import EOT, gpt2_encoding

# varied lengths (one longer than a shard, one empty) so documents spill across shard boundaries
DOCS = [
    f"Doc {i}: a red circle left of a blue square. " * (i % 5) + "naïve café 東京" * (i % 2)
    for i in range(30)
]
DOCS[7] = "long " * 150
DOCS[11] = ""
SHARD = 96  # 971 tokens in all: 10 full shards and a tail of 11


def expected_tokens(docs):
    enc = gpt2_encoding()
    return np.concatenate([[EOT, *enc.encode_ordinary(d)] for d in docs])


@pytest.fixture
def parquet_file(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": DOCS, "id": list(range(len(DOCS)))}), path)
    return path


def check_shards(paths, docs, out_dir):
    names = [p.name for p in paths]
    assert names[0] == "edufineweb_val_000000.npy"
    assert names[1:] == [f"edufineweb_train_{i:06d}.npy" for i in range(1, len(paths))]
    assert sorted(p.name for p in out_dir.glob("*.npy")) == sorted(names)
    shards = [load_shard(p) for p in paths]
    assert all(len(s) == SHARD for s in shards[:-1]) and 0 < len(shards[-1]) <= SHARD
    assert all(s.dtype == np.uint16 for s in shards)
    tokens = np.concatenate(shards)
    assert tokens[0] == EOT
    np.testing.assert_array_equal(tokens, expected_tokens(docs))


def test_parquet_exact_packing_and_rerun_skips(tmp_path, parquet_file, capsys):
    out = tmp_path / "out"
    paths = prepare_fineweb(out, files=[parquet_file], shard_size=SHARD, num_proc=2)
    check_shards(paths, DOCS, out)
    # progress is disabled off a TTY but each finished shard is still reported
    assert capsys.readouterr().err.count("wrote ") == len(paths)

    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert prepare_fineweb(out, files=[parquet_file], shard_size=SHARD, num_proc=2) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert "already prepared" in capsys.readouterr().err

    # without the manifest everything is re-tokenised, but identical shards are not rewritten
    (out / "edufineweb_manifest.json").unlink()
    assert prepare_fineweb(out, files=[parquet_file], shard_size=SHARD, num_proc=1) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes


def test_jsonl_gz_and_max_docs(tmp_path):
    plain, packed = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz"
    plain.write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS[:20]))
    with gzip.open(packed, "wt") as f:
        f.writelines(json.dumps({"content": d}) + "\n" for d in DOCS[20:])
    out = tmp_path / "out"
    paths = prepare_fineweb(out, files=[plain, packed], shard_size=SHARD, num_proc=2, text_key="content")
    check_shards(paths, DOCS, out)

    few = prepare_fineweb(
        tmp_path / "few", files=[plain], shard_size=SHARD, num_proc=1, max_docs=9, text_key="content"
    )
    check_shards(few, DOCS[:9], tmp_path / "few")


def test_resume_after_interruption(tmp_path, parquet_file, monkeypatch):
    ref = prepare_fineweb(tmp_path / "ref", files=[parquet_file], shard_size=SHARD, num_proc=1)
    out = tmp_path / "out"
    real_write, written = fineweb.write_shard, []

    def crash_after_three(path, tokens):
        if len(written) == 3:
            raise KeyboardInterrupt
        real_write(path, tokens)
        written.append(path)

    monkeypatch.setattr(fineweb, "write_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare_fineweb(out, files=[parquet_file], shard_size=SHARD, num_proc=2)
    manifest = json.loads((out / "edufineweb_manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and not manifest["complete"]
    assert manifest["carry"] > 0  # shard 2 ends inside a document: resume must drop its written part
    mtimes = [p.stat().st_mtime_ns for p in written]

    monkeypatch.setattr(fineweb, "write_shard", real_write)
    paths = prepare_fineweb(out, files=[parquet_file], shard_size=SHARD, num_proc=2)
    assert [p.name for p in paths] == [p.name for p in ref]
    assert [p.stat().st_mtime_ns for p in written] == mtimes
    check_shards(paths, DOCS, out)


def test_errors(tmp_path, parquet_file):
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet"):
        prepare_fineweb(tmp_path / "o1", files=[tmp_path / "nope.parquet"], num_proc=1)
    with pytest.raises(KeyError, match="'body'"):
        prepare_fineweb(tmp_path / "o2", files=[parquet_file], text_key="body", num_proc=2)
    prepare_fineweb(tmp_path / "o3", files=[parquet_file], shard_size=SHARD, num_proc=1, max_docs=3)
    with pytest.raises(ValueError, match="shard_size=96, now shard_size=50"):
        prepare_fineweb(tmp_path / "o3", files=[parquet_file], shard_size=50, num_proc=1, max_docs=3)
    with pytest.raises(ValueError, match="no documents"):
        prepare_fineweb(tmp_path / "o4", files=[parquet_file], max_docs=0, num_proc=1)


def test_single_token_tail_is_dropped(tmp_path):
    path = tmp_path / "empty_docs.parquet"
    pq.write_table(pa.table({"text": ["", "", ""]}), path)  # three lone EOTs
    paths = prepare_fineweb(tmp_path / "out", files=[path], shard_size=2, num_proc=1)
    assert [p.name for p in paths] == ["edufineweb_val_000000.npy"]
    np.testing.assert_array_equal(load_shard(paths[0]), [EOT, EOT])


def test_progress_bar_on_a_terminal(tmp_path, parquet_file, monkeypatch, capsys):
    monkeypatch.setattr(
        fineweb, "Console", functools.partial(fineweb.Console, force_terminal=True, width=120)
    )
    prepare_fineweb(tmp_path / "out", files=[parquet_file], shard_size=SHARD, num_proc=1, max_docs=5)
    err = capsys.readouterr().err
    assert "tok/s" in err and "tokens" in err and "wrote " in err
