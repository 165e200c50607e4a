"""prepare_fineweb on local parquet / jsonl files (offline): exact packing, names, resume, errors."""

import functools
import gzip
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import captioner.prepare.fineweb as fineweb
from captioner.data.shards import load_shard
from captioner.errors import UserError
from captioner.prepare.fineweb import prepare_fineweb
from captioner.tokenizer import EOT, gpt2_encoding

# varied lengths (one longer than a shard, one empty) so documents spill across shard boundaries
DOCS = [
    f"Doc {i}: a red circle left of a blue square. " * (i % 5) + "naïve café 東京" * (i % 2)
    for i in range(30)
]
DOCS[7] = "long " * 150
DOCS[11] = ""
DOCS[12] = "special-token text is ordinary text: <|endoftext|> as build-nanogpt's encode_ordinary reads it"
SHARD = 96  # 973 tokens in all: 10 full shards and a tail of 13


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


def test_jsonl_gz_json_array_and_max_docs(tmp_path):
    plain, packed, array = tmp_path / "a.jsonl", tmp_path / "b.jsonl.gz", tmp_path / "c.json"
    plain.write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS[:12]) + "\n")
    with gzip.open(packed, "wt") as f:
        f.writelines(json.dumps({"content": d, "n": 1}) + "\n" for d in DOCS[12:20])
    array.write_text(json.dumps([{"content": d} for d in DOCS[20:]], indent=1))
    out = tmp_path / "out"
    files = [plain, packed, array]
    paths = prepare_fineweb(out, files=files, shard_size=SHARD, num_proc=2, text_key="content")
    check_shards(paths, DOCS, out)

    few = prepare_fineweb(
        tmp_path / "few", files=[plain], shard_size=SHARD, num_proc=1, max_docs=9, text_key="content"
    )
    check_shards(few, DOCS[:9], tmp_path / "few")


@pytest.mark.parametrize("docs_per_batch", [1, 5, 64])
def test_same_shards_for_any_process_count_and_batch_size(
    tmp_path, parquet_file, monkeypatch, docs_per_batch
):
    monkeypatch.setattr(fineweb, "DOCS_PER_BATCH", docs_per_batch)
    for num_proc in (1, 3):
        out = tmp_path / f"out{num_proc}"
        check_shards(
            prepare_fineweb(out, files=[parquet_file], shard_size=SHARD, num_proc=num_proc), DOCS, out
        )


def test_encode_matches_encode_ordinary():
    enc = gpt2_encoding()
    for text in ["", "a <|endoftext|> b", "lone surrogate \ud800 here", DOCS[3]]:
        np.testing.assert_array_equal(fineweb.encode(text), enc.encode_ordinary(text))


@pytest.mark.parametrize(("crash_after", "docs_per_batch"), [(3, 64), (3, 5), (1, 5), (7, 1)])
def test_resume_after_interruption(tmp_path, parquet_file, monkeypatch, crash_after, docs_per_batch):
    monkeypatch.setattr(fineweb, "DOCS_PER_BATCH", docs_per_batch)
    ref = prepare_fineweb(tmp_path / "ref", files=[parquet_file], shard_size=SHARD, num_proc=1)
    out = tmp_path / "out"
    real_write, written = fineweb.save_npy, []

    def crash(path, tokens):
        if len(written) == crash_after:
            raise KeyboardInterrupt
        real_write(path, tokens)
        written.append(path)

    monkeypatch.setattr(fineweb, "save_npy", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_fineweb(out, files=[parquet_file], shard_size=SHARD, num_proc=2)
    manifest = json.loads((out / "edufineweb_manifest.json").read_text())
    assert len(manifest["shards"]) == crash_after and not manifest["complete"]
    if crash_after == 3:
        assert manifest["carry"] > 0  # shard 2 ends inside a document: resume must drop its written part
    mtimes = [p.stat().st_mtime_ns for p in written]

    # the documents already in shards are skipped, not tokenised again
    monkeypatch.setattr(fineweb, "save_npy", real_write)
    encoded = []
    monkeypatch.setattr(
        fineweb, "encode", lambda text, real=fineweb.encode: encoded.append(text) or real(text)
    )
    paths = prepare_fineweb(out, files=[parquet_file], shard_size=SHARD, num_proc=1)
    assert encoded == DOCS[manifest["docs_done"] :]
    assert [p.name for p in paths] == [p.name for p in ref]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in ref]
    assert [p.stat().st_mtime_ns for p in written] == mtimes
    check_shards(paths, DOCS, out)


def test_preparation_imports_neither_torch_nor_lightning():
    """Their import alone takes longer than build-nanogpt's whole run on a small corpus (issue #10)."""
    code = "import sys, captioner.prepare.fineweb; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def local_hub(parquet_file, monkeypatch):
    """The hub dataset served from parquet_file; `commits` maps each revision name to the commit it points at,
    `streamed` records the revision each stream was opened at."""
    import datasets

    real_load = datasets.load_dataset
    hub = type("Hub", (), {"commits": {"main": "c0ffee", "v1.0.0": "0ld"}, "streamed": []})

    def load_dataset(path, name, split, streaming, revision):
        assert (path, name, split, streaming) == ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True)
        hub.streamed.append(revision)
        return real_load("parquet", data_files=[str(parquet_file)], split=split, streaming=True)

    def hub_commit(dataset, revision):
        return hub.commits.get(revision, revision)  # a name, or already a commit

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(fineweb, "hub_commit", hub_commit)
    return hub


def test_hub_dataset_streams_through_datasets(tmp_path, local_hub):
    out = tmp_path / "out"
    check_shards(prepare_fineweb(out, shard_size=SHARD, num_proc=2), DOCS, out)
    assert local_hub.streamed == ["c0ffee"]  # main, resolved to its commit before streaming
    assert json.loads((out / "edufineweb_manifest.json").read_text())["settings"]["revision"] == "c0ffee"
    with pytest.raises(UserError, match="has no 'body' field"):
        prepare_fineweb(tmp_path / "o2", shard_size=SHARD, num_proc=1, text_key="body")


def test_a_resume_keeps_the_commit_it_started_from(tmp_path, local_hub, monkeypatch):
    out = tmp_path / "out"
    real_write, written = fineweb.save_npy, []

    def crash(path, tokens):
        if len(written) == 2:
            raise KeyboardInterrupt
        real_write(path, tokens)
        written.append(path)

    monkeypatch.setattr(fineweb, "save_npy", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_fineweb(out, revision="v1.0.0", shard_size=SHARD, num_proc=1)
    monkeypatch.setattr(fineweb, "save_npy", real_write)
    with pytest.raises(UserError, match=r"made with revision='0ld', now revision='c0ffee'"):
        prepare_fineweb(out, revision="main", shard_size=SHARD, num_proc=1)
    local_hub.commits["main"] = "n3w"  # main moves on: a resume without --revision still reads 0ld
    check_shards(prepare_fineweb(out, shard_size=SHARD, num_proc=1), DOCS, out)
    assert local_hub.streamed == ["0ld", "0ld"]


def test_errors(tmp_path, parquet_file):
    with pytest.raises(UserError, match=r"nope\.parquet"):
        prepare_fineweb(tmp_path / "o1", files=[tmp_path / "nope.parquet"], num_proc=1)
    with pytest.raises(UserError, match="'body'"):
        prepare_fineweb(tmp_path / "o2", files=[parquet_file], text_key="body", num_proc=2)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"text": "b"}\n{"body": "c"}\n')
    with pytest.raises(
        UserError, match=r"document 2 of .*rows\.jsonl has no 'text' field \(it has \['body'\]\)"
    ):
        prepare_fineweb(tmp_path / "o5", files=[rows], num_proc=1)
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


def test_cli_revision_reaches_the_hub_and_an_unknown_one_is_one_line(
    tmp_path, local_hub, monkeypatch, capsys
):
    import huggingface_hub.constants

    from captioner.cli.prepare import main

    out = tmp_path / "out"
    assert (
        main(["fineweb", "--out", str(out), "--revision", "v1.0.0", "--shard-size", "96", "--num-proc", "1"])
        == 0
    )
    assert local_hub.streamed == ["0ld"]
    monkeypatch.undo()  # the real resolver, offline: a UserError naming the dataset and revision, no traceback
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"dataset='HuggingFaceFW/fineweb-edu' revision='v9': cannot resolve"):
        fineweb.hub_commit("HuggingFaceFW/fineweb-edu", "v9")
