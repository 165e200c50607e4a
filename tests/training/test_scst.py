"""Self-critical training (training/scst.py): the step's pieces, then a tiny run from a caption checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import captioner
from captioner.cli.train import train
from captioner.errors import UserError
from captioner.tokenizer import EOT
from captioner.training.scst import SelfCriticalModule
from tests.cli.test_train_e2e import (  # noqa: F401 (fixtures)
    caption_overrides,
    caption_run,
    pretrain_run,
    shapes_dir,
    standin_clip,
)
from tests.helpers import compose_run, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def caption_ckpt(caption_run):  # noqa: F811
    return caption_run / "checkpoints" / "last.ckpt"


def scst_overrides(data_dir, ckpt, steps: int, *extra: str) -> list[str]:
    return [
        f"paths.data_dir={data_dir}",
        f"model.init_ckpt={ckpt}",
        f"trainer.max_steps={steps}",
        "model.samples=3",
        "model.max_new_tokens=8",
        "model.temperature=20",  # the 7-step fixture captioner says EOT at once with p 0.998: varied samples
        "model.scorers.captions.backend=python",
        "data.batch_size=4",
        "data.val_gen_images=4",
        "val_every_n_steps=2",
        "ckpt_every_n_steps=2",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def test_sample_log_probs_are_the_models_own(caption_ckpt):
    module = SelfCriticalModule(str(caption_ckpt), samples=2, max_new_tokens=4)
    module.load_pretrained()
    lm = module.model.lm
    context = torch.randn(3, module.model.vision.num_tokens, lm.config.n_embd)
    a, b, c, d, e, f = lm.config.vocab_ids[:6]  # the fixture's demo LM reads the shapes world's ids only
    samples = [[a, b], [c, d, e, f], []]  # stopped, cut at the limit, stopped at once
    log_probs, rows = module._sample_log_probs(samples, context)
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 1, 2]  # stopped samples add their EOT as a target
    expected = []
    for m, sample in enumerate(samples):
        ids = torch.tensor([[EOT, *sample]])
        logits, _ = lm(ids, context=context[m : m + 1])
        targets = [*sample, EOT] if len(sample) < 4 else sample
        logp = F.log_softmax(logits[0].float(), dim=-1)
        expected += [logp[t, token] for t, token in enumerate(targets)]
    torch.testing.assert_close(log_probs, torch.stack(expected))


def test_bad_settings_are_one_line_errors(caption_ckpt, pretrain_run):  # noqa: F811
    with pytest.raises(UserError, match="at least 2 samples"):
        SelfCriticalModule(str(caption_ckpt), samples=1)
    with pytest.raises(UserError, match="baseline must be one of mean, greedy"):
        SelfCriticalModule(str(caption_ckpt), baseline="max")
    with pytest.raises(UserError, match="not a caption run's checkpoint"):
        SelfCriticalModule(str(pretrain_run / "checkpoints" / "last.ckpt"))


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_a_tiny_run_logs_rewards_and_leaves_a_loadable_captioner(
    tmp_path,
    shapes_dir,  # noqa: F811
    caption_ckpt,
    baseline,
):
    run = tmp_path / "scst"
    overrides = scst_overrides(shapes_dir, caption_ckpt, 3, f"model.baseline={baseline}")
    train(compose_run("demo_caption_scst", run, *overrides))
    metrics = read_metrics(run / "metrics.csv")
    for key in ("train/reward", "train/advantage_std", "train/sample_len", "train/loss", "val/cider"):
        assert key in metrics, key
    assert all(v >= 0 for _, v in metrics["train/reward"]) and 0 < metrics["train/sample_len"][0][1] <= 8
    assert list((shapes_dir / "shapes" / "images" / "annotations").glob("cider_df_train_*.npz"))
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    init = torch.load(caption_ckpt, weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["hyper_parameters"]["scst"]["baseline"] == baseline
    changed = {k for k, v in ckpt["state_dict"].items() if not torch.equal(v, init["state_dict"][k])}
    trained = init["hyper_parameters"]["trainable"]  # the caption run's freeze policy
    assert changed and all(("clip" not in k) for k in changed), sorted(changed)[:3]
    assert "vision" not in trained
    model = captioner.load(run / "checkpoints" / "last.ckpt", device="cpu")  # an ordinary caption checkpoint
    assert len(model.caption([next((shapes_dir / "shapes" / "images" / "val").iterdir())], beams=1)) == 1


def test_resume_is_exact(tmp_path, shapes_dir, caption_ckpt):  # noqa: F811
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(compose_run("demo_caption_scst", straight, *scst_overrides(shapes_dir, caption_ckpt, 4)))
    train(compose_run("demo_caption_scst", stopped, *scst_overrides(shapes_dir, caption_ckpt, 2)))
    resumed = scst_overrides(
        shapes_dir, caption_ckpt, 4, f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}"
    )
    train(compose_run("demo_caption_scst", stopped, *resumed))
    a = read_metrics(straight / "metrics.csv")["train/reward"]
    b = read_metrics(stopped / "metrics.csv")["train/reward"]
    assert [s for s, _ in a] == [s for s, _ in b]
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-6)
