"""Attention maps in training's validation: which batches get them, what the scorers receive, the gallery and the
wandb rows that show them."""

import contextlib
import html
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.errors import UserError
from captioner.models.attention_maps import AttentionMaps
from captioner.training.callbacks.gallery import (
    CaptionGalleryCallback,
    caption_words,
    render_gallery,
    wandb_table,
)
from captioner.training.caption import GENERATION, CaptionModule
from tests.helpers import TINY_CLIP

GREEDY = {"method": "greedy", "max_new_tokens": 6}
CALLS: list[tuple[str, dict, dict]] = []  # (scorer, predictions, keyword arguments) of the recording scorers


class AttentionScorer:
    needs_attention = True

    def __call__(self, predictions, references, **kwargs):
        CALLS.append(("attention", dict(predictions), kwargs))
        return {"seen": float(len(kwargs["attention"]))}, {}


class PlainScorer:
    def __call__(self, predictions, references, **kwargs):
        CALLS.append(("plain", dict(predictions), kwargs))
        return {"plain": 1.0}, {image_id: {"plain": 1.0} for image_id in predictions}


SCORERS = {
    "attention": {"_target_": f"{__name__}.AttentionScorer"},
    "plain": {"_target_": f"{__name__}.PlainScorer"},
}


def module(seed: int = 0, **kwargs) -> CaptionModule:
    torch.manual_seed(seed)
    m = CaptionModule(
        lm={"config": "tiny"}, vision={"clip": None, "clip_config": TINY_CLIP}, cross_every=1, **kwargs
    ).eval()
    with torch.no_grad():  # fresh gates are closed: open them so that each image gets its own caption
        for p in m.model.parameters():
            p.add_(torch.randn_like(p))
    return m


def generation_batch(ids: list[int]) -> dict:
    torch.manual_seed(sum(ids))
    return {
        "pixel_values": torch.randn(len(ids), 3, 64, 64),
        "image_ids": torch.tensor(ids),
        "paths": [f"{i}.png" for i in ids],
        "references": [[f"r{i}"] for i in ids],
    }


def validate(m: CaptionModule, batches: list[list[int]]) -> list[dict]:
    m.on_validation_epoch_start()
    for k, ids in enumerate(batches):
        m.validation_step(generation_batch(ids), k, dataloader_idx=GENERATION)
    return m._generated


def test_a_scorer_that_needs_attention_gets_every_images_maps_and_the_others_do_not():
    CALLS.clear()
    m = module(generation=GREEDY, scorers=SCORERS)
    items = validate(m, [[3, 8], [5]])
    overall, per_image = m.score(items)
    assert overall == {"seen": 3.0, "plain": 1.0}
    assert per_image == {i: {"plain": 1.0} for i in (3, 5, 8)}
    (attention,) = [kwargs["attention"] for name, _, kwargs in CALLS if name == "attention"]
    (plain,) = [kwargs for name, _, kwargs in CALLS if name == "plain"]
    assert plain == {}
    assert sorted(attention) == [3, 5, 8]
    for item in items:
        maps = attention[item["image_id"]]
        assert isinstance(maps, AttentionMaps) and "".join(maps.tokens).strip() == item["caption"]
        assert maps.patches.dtype == np.float32 and maps.patches.shape == (len(maps.tokens), 4, 4)


@pytest.mark.parametrize("generation", [GREEDY, {"method": "beam", "num_beams": 3, "max_new_tokens": 6}])
def test_captions_are_the_same_with_and_without_maps(generation):
    plain = module(generation=generation)
    mapped = module(generation=generation, scorers=SCORERS)
    mapped.load_state_dict(plain.state_dict())
    batches = [[1, 2, 3], [4, 5]]
    without, with_maps = validate(plain, batches), validate(mapped, batches)
    assert all("attention" not in item for item in without)
    assert all("attention" in item for item in with_maps)
    assert [item["caption"] for item in with_maps] == [item["caption"] for item in without]
    assert len({item["caption"] for item in without}) > 1


def attach(m: CaptionModule, rank: int, world_size: int) -> None:
    """A stand-in Trainer with just what validation asks of one outside a fit: rank, world size, precision."""
    precision = SimpleNamespace(forward_context=contextlib.nullcontext)
    m.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, precision_plugin=precision)


@pytest.mark.parametrize(("rank", "mapped"), [(0, [0, 2, 4, 6]), (1, [1, 3])])
def test_without_such_a_scorer_only_the_batches_holding_the_first_images_get_maps(rank, mapped):
    """5 images wanted on 2 ranks, 2 per batch: global image k = rank + 2 * local index; a rank maps each whole
    batch whose first image comes before the 5th."""
    m = module(generation=GREEDY, attention_images=5)
    attach(m, rank, world_size=2)
    ids = [rank + 2 * local for local in range(6)]  # the ids name the global index here
    items = validate(m, [ids[0:2], ids[2:4], ids[4:6]])
    assert [item["image_id"] for item in items if "attention" in item] == mapped
    none = module(generation=GREEDY)  # attention_images=0: no maps, and no Trainer needed to decide so
    assert all("attention" not in item for item in validate(none, [[1, 2]]))


def test_scorer_targets_are_checked_when_the_module_is_built():
    with pytest.raises(UserError, match=r"model\.scorers\.bad\._target_=captioner\.nope\.Scorer"):
        module(scorers={"bad": {"_target_": "captioner.nope.Scorer"}})
    with pytest.raises(UserError, match=r"model\.scorers\.bad: needs a _target_"):
        module(scorers={"bad": {"scenes": "x.json"}})
    with pytest.raises(UserError, match="attention_images must be >= 0"):
        module(attention_images=-1)


# ---------------------------------------------------------------- gallery and wandb


def fake_maps(tokens: list[str], peak: int) -> AttentionMaps:
    patches = np.full((len(tokens), 3, 3), 0.05, dtype=np.float32)
    patches.reshape(len(tokens), 9)[:, peak] = 0.6
    return AttentionMaps(
        tokens=tokens, patches=patches, cls=np.linspace(0.1, 0.5, len(tokens), dtype=np.float32)
    )


def gallery_items(tmp_path) -> list[dict]:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    tokens = ["a", " red", " squ", "are", "."]
    return [
        {"image_id": 1, "path": tmp_path / "red.png", "caption": "a <b>blue</b> one", "references": ["x"]},
        {
            "image_id": 2,
            "path": tmp_path / "red.png",
            "caption": "".join(tokens),
            "references": ["a red square"],
            "scores": {"pointing_acc": 1.0},
            "attention": fake_maps(tokens, peak=4),
        },
    ]


def test_caption_words_join_word_pieces_and_keep_each_words_first_token():
    assert caption_words(fake_maps(["a", " red", " squ", "are", "."], 0)) == [
        ("a", 0),
        ("red", 1),
        ("square.", 2),
    ]


def test_gallery_shows_words_with_their_grids_and_leaves_items_without_maps_as_they_were(tmp_path):
    plain, mapped = gallery_items(tmp_path)
    page = render_gallery([plain, mapped])
    grids = [json.loads(html.unescape(g)) for g in page.split('data-grid="')[1:] for g in [g.split('"')[0]]]
    assert len(grids) == 3  # a, red, square.: the grid of each word's first token, rounded
    assert grids[2] == np.round(mapped["attention"].patches[2].astype(np.float64), 4).tolist()
    for word in ("a", "red", "square."):
        assert f">{word}</span>" in page
    assert page.count("<canvas>") == 1 and "<script>" in page and "attention on CLS: 30%" in page
    # the item without maps keeps its escaped caption text, and a page of such items has no script at all
    assert '<td class="caption">a &lt;b&gt;blue&lt;/b&gt; one</td>' in page
    alone = render_gallery([plain])
    assert "<script>" not in alone and "data-grid" not in alone and "<canvas>" not in alone
    assert "Hover a word" not in alone and "Hover a word" in page


def test_wandb_rows_carry_an_attention_strip_only_where_there_are_maps(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import wandb

    plain, mapped = gallery_items(tmp_path)
    columns, rows = wandb_table([plain, mapped])
    assert columns == ["image", "caption", "references", "pointing_acc", "attention"]
    assert rows[0][-1] is None and isinstance(rows[1][-1], wandb.Image)
    assert rows[1][-1].image.size[0] == 100 * 6  # the image + one overlay per token, 96 px + 4 px apart
    columns, rows = wandb_table([plain])
    assert columns == ["image", "caption", "references"] and len(rows[0]) == 3


def test_the_gallery_puts_the_items_with_maps_first(tmp_path):
    plain, mapped = gallery_items(tmp_path)
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, default_root_dir=str(tmp_path), loggers=[]
    )
    module = SimpleNamespace(val_predictions=[plain, mapped], val_scores={})
    CaptionGalleryCallback(max_items=1).on_validation_end(trainer, module)
    page = (tmp_path / "gallery.html").read_text()
    assert "data-grid" in page and "blue" not in page
