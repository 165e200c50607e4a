import pytest

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
