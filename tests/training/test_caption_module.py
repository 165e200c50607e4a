import pytest
import torch

from captioner.data.captions import CaptionCollate
from captioner.errors import UserError
from captioner.training.caption import CaptionModule, resolve_lm, resolve_vision
from tests.helpers import TINY_CLIP


def test_lm_source_is_required_and_unambiguous(tmp_path):
    with pytest.raises(ValueError, match=r"model\.lm\.ckpt"):
        resolve_lm({"ckpt": None, "hf": None, "config": None})
    with pytest.raises(ValueError, match="not both"):
        resolve_lm({"ckpt": "a.ckpt", "hf": "gpt2", "config": None})
    with pytest.raises(UserError, match=r"missing\.ckpt"):
        resolve_lm({"ckpt": str(tmp_path / "missing.ckpt"), "hf": None, "config": None})


def test_random_lm_config_is_resolved_to_plain_fields():
    lm = resolve_lm({"ckpt": None, "hf": None, "config": "tiny"})
    assert lm["config"]["n_layer"] == 2 and lm["config"]["vocab_size"] == 50304
    assert resolve_lm(lm)["config"] == lm["config"]  # idempotent: a checkpoint's hparams rebuild offline


def test_offline_clip_name_error_names_the_key():
    with pytest.raises(UserError, match=r"model\.vision\.clip"):
        resolve_vision({"clip": "no-such-org/no-such-clip", "clip_config": None})


def test_a_batch_of_only_unreadable_images_gives_a_zero_loss_touching_every_trainable_parameter():
    """What keeps DDP's all-reduce in step when one rank's whole batch was unreadable; decided from the batch's
    shape alone (no device read in the training step)."""
    module = CaptionModule(
        lm={"config": "tiny"}, vision={"clip": None, "clip_config": TINY_CLIP}, cross_every=1
    )
    collate = CaptionCollate("pixel_values", (3, 64, 64))
    batch = collate([{"skipped": "a.jpg", "image_id": 1}, {"skipped": "b.jpg", "image_id": 2}])
    assert batch["labels"].shape == (0, 0) and batch["skipped"] == ["a.jpg", "b.jpg"]
    loss = module._loss(batch)
    assert float(loss) == 0.0
    loss.backward()
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)


def test_validation_captions_the_generation_images_with_the_configured_settings():
    torch.manual_seed(0)
    generation = {"method": "greedy", "max_new_tokens": 5}  # not the default: beam search
    module = CaptionModule(
        lm={"config": "tiny"},
        vision={"clip": None, "clip_config": TINY_CLIP},
        cross_every=1,
        generation=generation,
    ).eval()
    with torch.no_grad():  # fresh gates are closed: open them so that each image gets its own caption
        for p in module.model.parameters():
            p.add_(torch.randn_like(p))
    pixels = torch.randn(3, 3, 64, 64)
    batch = {"pixel_values": pixels, "image_ids": torch.tensor([5, 7, 9]), "paths": ["a", "b", "c"]}
    batch["references"] = [["r5"], ["r7"], ["r9"]]
    module.on_validation_epoch_start()
    module.validation_step(batch, 0, dataloader_idx=1)
    expected = module.model.caption(pixels, **generation)
    assert len(set(expected)) > 1, expected
    assert module._generated == [
        {"image_id": i, "path": path, "caption": caption, "references": [f"r{i}"]}
        for i, path, caption in zip([5, 7, 9], "abc", expected, strict=True)
    ]
