"""Training items with all their image's captions as token ids: the self-critical reward's references."""

from __future__ import annotations

from captioner.data.captions import encode_caption
from captioner.tokenizer import EOT, gpt2_encoding
from tests.data.test_captions import _captions_by_id, make_dm, root  # noqa: F401 (fixture)


def test_train_items_carry_every_caption_of_their_image(root):  # noqa: F811
    dm = make_dm(root, max_caption_tokens=8, batch_size=6, captions_per_epoch="one", train_references=True)
    enc = gpt2_encoding()
    expected = {}
    for image_id, captions in _captions_by_id(root, "train").items():
        expected[image_id] = [encode_caption(c, enc, 8)[1:] for c in captions]  # without the opening EOT
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["references"]) == len(batch["image_ids"]) == 6
    for image_id, refs in zip(batch["image_ids"].tolist(), batch["references"], strict=True):
        assert refs == expected[image_id] and all(EOT not in r[:-1] for r in refs)
    ends = [r[-1] == EOT for refs in batch["references"] for r in refs]
    assert any(ends) and not all(ends)  # a caption ends with EOT unless it was cut (at 8 tokens)
    corpus, digest = dm.reference_corpus()
    assert corpus == [expected[i] for i in sorted(expected)]  # the annotation file's image order
    assert digest == make_dm(root, max_caption_tokens=8).reference_corpus()[1]
    assert digest != make_dm(root, max_caption_tokens=9).reference_corpus()[1]
    assert "references" not in next(iter(dm.val_dataloader()[0]))  # validation pairs: as before


def test_without_the_option_batches_are_unchanged(root):  # noqa: F811
    batch = next(iter(make_dm(root).train_dataloader()))
    assert "references" not in batch
    empty = (
        make_dm(root, train_references=True).train_dataloader().collate_fn([{"skipped": "a", "image_id": 1}])
    )
    assert empty["references"] == []  # a batch of unreadable images still has the key
