"""HellaSwag: download (loopback server), loading/validation, rendering, and the batched scorer vs build-nanogpt's
one-example-at-a-time loop."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.data.hellaswag import load_examples, render_example
from captioner.errors import UserError
from captioner.eval.hellaswag import (
    _pack,
    _truncate,
    _Unit,
    _units,
    ending_losses,
    evaluate_hellaswag,
    packed_ending_losses,
    score_hellaswag,
)
from captioner.models.compact_vocab import CompactVocabConfig, build_lm
from captioner.models.gpt import GPT, GPTConfig
from captioner.prepare.hellaswag import download_hellaswag
from captioner.tokenizer import EOT, gpt2_encoding

EXAMPLES = [
    {"ctx": "A man is sitting on a roof. he", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "A woman", "label": 0, "endings": ["smiles.", "is eating a very large sandwich in the park today.", "runs", "x"]},
    {"ctx": "The red square is left of the blue circle. The blue circle is", "label": 1,
     "endings": ["left of the red square.", "right of the red square.", "above", "below the green triangle."]},
    {"ctx": "Kids play", "label": 2, "endings": ["in", "on the beach with a bright yellow ball", "football", "."]},
    # longer than the tiny model's block (64 tokens): the context must be cut from the left
    {"ctx": " ".join(["The cat sat on the mat and looked at the dog."] * 6) + " Then the cat", "label": 2,
     "endings": ["barked loudly.", "flew away over the hills and far away.", "fell asleep.", "ate the moon."]},
    {"ctx": "She opens the oven and", "label": 1,
     "endings": ["takes out a tray of cookies.", "takes out the bread.", "sings.", "closes the door again slowly."]},
    {"ctx": "Two dogs run across a field", "label": 3, "endings": ["and", "while", "but", "chasing a ball together."]},
    {"ctx": "He picks up the guitar, tunes it for a while, and then", "label": 0,
     "endings": ["plays a song.", "eats it.", "throws the guitar out of the window into the rain.", "sleeps"]},
]  # fmt: skip


def write_jsonl(path, examples) -> None:
    path.write_text("".join(json.dumps(ex) + "\n" for ex in examples))


@pytest.fixture
def hellaswag_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    write_jsonl(path, EXAMPLES)
    return path


@pytest.fixture(params=["full", "vocab_ids"])
def tiny_gpt(request):
    if request.param == "full":
        return GPT(GPTConfig.named("tiny"))
    # a model over only the ids these examples use (+ EOT): logits -inf elsewhere, the same scores' rules
    enc = gpt2_encoding()
    ids = {EOT} | {t for ex in EXAMPLES for row in render_example(ex, enc)[0] for t in row}
    return build_lm(CompactVocabConfig.named("tiny", vocab_ids=sorted(ids)))


def reference_counts_and_preds(model, examples, block_size):
    """build-nanogpt's loop: one example (4 rows) per forward, mask over ending tokens, argmin of sum / mean loss.

    Rows too long for the model lose tokens from the left, token and mask alike.
    """
    enc = gpt2_encoding()
    preds = []
    for example in examples:
        ctx = enc.encode(example["ctx"])
        tok_rows, mask_rows = [], []
        for ending in example["endings"]:
            end = enc.encode(" " + ending)
            tok_rows.append((ctx + end)[-block_size:])
            mask_rows.append(([0] * len(ctx) + [1] * len(end))[-block_size:])
        max_len = max(len(row) for row in tok_rows)
        tokens = torch.zeros((4, max_len), dtype=torch.long)
        mask = torch.zeros((4, max_len), dtype=torch.long)
        for i, (tok_row, mask_row) in enumerate(zip(tok_rows, mask_rows)):
            tokens[i, : len(tok_row)] = torch.tensor(tok_row)
            mask[i, : len(mask_row)] = torch.tensor(mask_row)
        with torch.no_grad():
            logits, _ = model(tokens)
        shift_logits = logits[..., :-1, :].contiguous()
        shift_tokens = tokens[..., 1:].contiguous()
        losses = F.cross_entropy(
            shift_logits.view(-1, shift_logits.size(-1)), shift_tokens.view(-1), reduction="none"
        ).view(4, -1)
        shift_mask = mask[..., 1:]
        sum_loss = (losses * shift_mask).sum(dim=1)
        avg_loss = sum_loss / shift_mask.sum(dim=1)
        preds.append((sum_loss, avg_loss))
    correct = sum(int(s.argmin()) == ex["label"] for (s, _), ex in zip(preds, examples))
    correct_norm = sum(int(a.argmin()) == ex["label"] for (_, a), ex in zip(preds, examples))
    return {"n": len(examples), "correct": correct, "correct_norm": correct_norm}, preds


def test_load_and_render(hellaswag_file):
    examples = load_examples(hellaswag_file)
    assert len(examples) == len(EXAMPLES)
    assert len(load_examples(hellaswag_file, limit=3)) == 3
    enc = gpt2_encoding()
    rows, starts = render_example(examples[0], enc)
    ctx = enc.encode(examples[0]["ctx"])
    assert len(rows) == 4 and starts == [len(ctx)] * 4
    for row, ending in zip(rows, examples[0]["endings"]):
        assert row[: len(ctx)] == ctx and row[len(ctx) :] == enc.encode(" " + ending)


def test_batched_scores_equal_one_at_a_time(tiny_gpt):
    tiny_gpt.train()
    block_size = tiny_gpt.config.block_size
    assert len(gpt2_encoding().encode(EXAMPLES[4]["ctx"])) > block_size  # the truncation path is exercised
    ref_counts, ref_preds = reference_counts_and_preds(tiny_gpt.eval(), EXAMPLES, block_size)
    tiny_gpt.train()

    counts = score_hellaswag(tiny_gpt, EXAMPLES, batch_size=3)
    assert counts == ref_counts
    assert tiny_gpt.training  # train mode restored

    enc = gpt2_encoding()
    for b in range(0, len(EXAMPLES), 3):
        chunk = EXAMPLES[b : b + 3]
        rendered = [_truncate(*render_example(ex, enc), block_size) for ex in chunk]
        with torch.no_grad():
            sum_loss, mean_loss = ending_losses(tiny_gpt.eval(), rendered, "cpu")  # (E, 4) each
        for j, (ref_sum, ref_mean) in enumerate(ref_preds[b : b + 3]):
            torch.testing.assert_close(sum_loss[j], ref_sum, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mean_loss[j], ref_mean, rtol=1e-5, atol=1e-5)
            assert int(sum_loss[j].argmin()) == int(ref_sum.argmin())
            assert int(mean_loss[j].argmin()) == int(ref_mean.argmin())


def test_packed_losses_equal_one_example_at_a_time(tiny_gpt):
    """Contexts fed once with their 4 endings, several examples per row: the same losses as build-nanogpt's rows
    (the over-long example falls back to one unit per row)."""
    block_size = tiny_gpt.config.block_size
    ref_counts, ref_preds = reference_counts_and_preds(tiny_gpt.eval(), EXAMPLES, block_size)
    enc = gpt2_encoding()
    rendered = [_truncate(*render_example(ex, enc), block_size) for ex in EXAMPLES]
    units = [u for e, (rows, starts) in enumerate(rendered) for u in _units(e, rows, starts, block_size)]
    assert len(units) == len(EXAMPLES) + 3  # example 4 is cut differently per row: 4 units instead of 1
    rows = _pack(units, block_size)
    assert len(rows) < len(units) and all(sum(map(len, row)) <= block_size for row in rows)
    assert sorted(slot for row in rows for u in row for slot in u.owners) == list(range(4 * len(EXAMPLES)))
    with torch.no_grad():
        sum_loss, mean_loss = packed_ending_losses(tiny_gpt, rows, 4 * len(EXAMPLES), "cpu")  # (4E,) each
    for e, (ref_sum, ref_mean) in enumerate(ref_preds):
        torch.testing.assert_close(sum_loss[4 * e : 4 * e + 4], ref_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mean_loss[4 * e : 4 * e + 4], ref_mean, rtol=1e-5, atol=1e-5)
    for batch_size in (1, 3, 100):
        assert score_hellaswag(tiny_gpt, EXAMPLES, batch_size=batch_size, pack=True) == ref_counts
    assert score_hellaswag(tiny_gpt, EXAMPLES, batch_size=3, pack=False) == ref_counts


def test_packing_fills_rows():
    sizes = [9, 1, 5, 5, 3, 7, 2, 8]
    units = [_Unit([1] * (n - 1), [[2]], [i]) for i, n in enumerate(sizes)]
    rows = _pack(units, 10)
    assert [[len(u) for u in row] for row in rows] == [[9, 1], [8, 2], [7, 3], [5, 5]]


def test_rank_split_counts_sum_to_world_one(tiny_gpt):
    whole = score_hellaswag(tiny_gpt, EXAMPLES, batch_size=4)
    parts = [score_hellaswag(tiny_gpt, EXAMPLES, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert [p["n"] for p in parts] == [len(EXAMPLES[0::2]), len(EXAMPLES[1::2])]
    assert {k: parts[0][k] + parts[1][k] for k in whole} == whole


class PrefersToken(nn.Module):
    """Predicts `token` everywhere with high confidence; `as_tuple` mimics GPT's (logits, loss) return."""

    def __init__(self, token: int, as_tuple: bool, block_size: int = 64):
        super().__init__()
        self.config = GPTConfig.named("tiny", block_size=block_size)
        self.token, self.as_tuple = token, as_tuple
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, 50257) + self.dummy  # (B, T, V)
        logits[..., self.token] = 20.0
        return (logits, None) if self.as_tuple else logits


@pytest.mark.parametrize("as_tuple", [True, False])
def test_model_preferring_right_ending_scores_one(tmp_path, as_tuple):
    (yes,) = gpt2_encoding().encode(" yes")
    examples = []
    for i in range(6):
        endings = ["no", "maybe so", "no no no", "perhaps"]
        endings[i % 4] = "yes yes yes" if i % 2 else "yes"  # right ending sometimes longer, sometimes shorter
        examples.append({"ctx": f"Question {i}: is it", "label": i % 4, "endings": endings})
    path = tmp_path / "right.jsonl"
    write_jsonl(path, examples)
    result = evaluate_hellaswag(PrefersToken(yes, as_tuple), path, batch_size=4)
    assert result == {"n": 6, "acc": 1.0, "acc_norm": 1.0}


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"label": 0, "endings": ["a", "b", "c", "d"]}', "missing key 'ctx'"),
        ('{"ctx": "c", "endings": ["a", "b", "c", "d"]}', "missing key 'label'"),
        ('{"ctx": "c", "label": 0}', "missing key 'endings'"),
        ('{"ctx": "c", "label": 4, "endings": ["a", "b", "c", "d"]}', "key 'label'"),
        ('{"ctx": "c", "label": true, "endings": ["a", "b", "c", "d"]}', "key 'label'"),
        ('{"ctx": "c", "label": 1, "endings": ["a", "b", "c"]}', "key 'endings'"),
        ('{"ctx": 3, "label": 1, "endings": ["a", "b", "c", "d"]}', "key 'ctx'"),
        ('{"ctx": "c", "label": 1, ', "invalid JSON"),
    ],
)
def test_validation_errors_name_file_line_and_key(tmp_path, line, needle):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: ") as err:
        load_examples(path)
    assert needle in str(err.value)


def test_missing_file_and_string_labels(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl"):
        load_examples(tmp_path / "nope.jsonl")
    path = tmp_path / "hf_style.jsonl"
    write_jsonl(path, [{**EXAMPLES[0], "label": "2"}])  # the HF datasets copy stores labels as strings
    assert load_examples(path)[0]["label"] == 2


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """A loopback server for the files of tmp_path/served; yields its base URL."""
    directory = tmp_path / "served"
    directory.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=directory)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_download_is_cached_and_atomic(tmp_path, served):
    write_jsonl(tmp_path / "served" / "hellaswag_val.jsonl", EXAMPLES)
    out = tmp_path / "data"
    path = download_hellaswag(out, "val", url=f"{served}/hellaswag_val.jsonl")
    assert path == out / "hellaswag_val.jsonl"
    assert path.read_bytes() == (tmp_path / "served" / "hellaswag_val.jsonl").read_bytes()
    with pytest.raises(OSError):  # a 404 leaves no partial file behind
        download_hellaswag(out, "train", url=f"{served}/hellaswag_train.jsonl")
    assert sorted(p.name for p in out.iterdir()) == ["hellaswag_val.jsonl"]
    assert download_hellaswag(out, "val", url="http://127.0.0.1:9/gone") == path  # cached: no server needed
    with pytest.raises(ValueError, match="split"):
        download_hellaswag(out, "dev")


def test_prepare_cli_takes_a_mirror_url_and_refuses_the_unlabelled_test_split(tmp_path, served, capsys):
    from captioner.cli.prepare import main

    write_jsonl(tmp_path / "served" / "copy.jsonl", EXAMPLES)
    out = tmp_path / "data"
    assert main(["hellaswag", "--out", str(out), "--url", f"{served}/copy.jsonl"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "hellaswag_val.jsonl")
    with pytest.raises(SystemExit) as exit_info:  # before any request: there is no server at this URL
        main(["hellaswag", "--out", str(out), "--split", "test", "--url", "http://127.0.0.1:9/x"])
    assert exit_info.value.code == 2
    assert "test split has no labels" in capsys.readouterr().err


def test_a_download_that_is_not_hellaswag_is_deleted(tmp_path, served):
    (tmp_path / "served" / "proxy.html").write_text("<html>sign in to continue</html>\n")
    with pytest.raises(UserError, match=r"invalid JSON .*proxy\.html\); deleted it"):
        download_hellaswag(tmp_path / "data", "val", url=f"{served}/proxy.html")
    assert not (tmp_path / "data" / "hellaswag_val.jsonl").exists()


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig.named("tiny"))
        counts = score_hellaswag(model, EXAMPLES, batch_size=3, rank=rank, world_size=world_size)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(counts, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_ddp_counts_are_all_reduced(tmp_path):
    torch.manual_seed(0)
    whole = score_hellaswag(GPT(GPTConfig.named("tiny")), EXAMPLES, batch_size=3)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):  # every rank returns the totals, equal to the single-process counts
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == whole
