import pytest

from captioner.training.caption import resolve_lm, resolve_vision


def test_lm_source_is_required_and_unambiguous(tmp_path):
    with pytest.raises(ValueError, match=r"model\.lm\.ckpt"):
        resolve_lm({"ckpt": None, "hf": None, "config": None})
    with pytest.raises(ValueError, match="not both"):
        resolve_lm({"ckpt": "a.ckpt", "hf": "gpt2", "config": None})
    with pytest.raises(FileNotFoundError, match=r"missing\.ckpt"):
        resolve_lm({"ckpt": str(tmp_path / "missing.ckpt"), "hf": None, "config": None})


def test_random_lm_config_is_resolved_to_plain_fields():
    lm = resolve_lm({"ckpt": None, "hf": None, "config": "tiny"})
    assert lm["config"]["n_layer"] == 2 and lm["config"]["vocab_size"] == 50304
    assert resolve_lm(lm)["config"] == lm["config"]  # idempotent: a checkpoint's hparams rebuild offline


def test_offline_clip_name_error_names_the_key():
    with pytest.raises(OSError, match=r"model\.vision\.clip"):
        resolve_vision({"clip": "no-such-org/no-such-clip", "clip_config": None})
