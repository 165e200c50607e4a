"""Every experiment composes, and the composed configs carry the recipes and contracts."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from captioner.cli.train import CONFIG_DIR

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_every_documented_experiment_exists():
    documented = {"demo_pretrain", "demo_caption", "pretrain_gpt2_124m", "caption_coco2017"}
    assert documented | {"demo_caption_scst", "caption_coco2017_scst"} <= set(EXPERIMENTS)


def test_self_critical_needs_its_caption_run():
    cfg = compose_cfg("experiment=caption_coco2017_scst")
    assert OmegaConf.is_missing(cfg.model, "init_ckpt")  # one line from captioner-train if not given
    assert cfg.data.train_references and cfg.data.captions_per_epoch == "one"
    assert (cfg.model.samples, cfg.model.baseline, cfg.model.temperature) == (5, "mean", 1.0)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_resolves(experiment, tmp_path):
    cfg = compose_cfg(f"experiment={experiment}", f"hydra.run.dir={tmp_path}")
    OmegaConf.resolve(cfg.hydra)  # hydra node resolves against itself
    cfg_no_hydra = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    # paths.run_dir interpolates ${hydra:...}, only available inside a run: stub it as Hydra would.
    cfg_no_hydra.paths.run_dir = str(tmp_path)
    OmegaConf.resolve(cfg_no_hydra)
    for key in ("seed", "ckpt_path", "keep_freed_memory", "trainer", "model", "data"):
        assert key in cfg_no_hydra, key
    assert cfg_no_hydra.name == experiment
    assert cfg_no_hydra.trainer.use_distributed_sampler is False


def test_pretrain_recipe_is_build_nanogpt():
    cfg = compose_cfg("experiment=pretrain_gpt2_124m")
    d, m, t = cfg.data, cfg.model, cfg.trainer
    assert d.micro_batch_size * d.seq_len * 64 == d.total_batch_tokens == 524_288
    assert (m.optim.lr, m.optim.warmup_steps, m.optim.min_lr_ratio) == (6e-4, 715, 0.1)
    assert tuple(m.optim.betas) == (0.9, 0.95) and m.optim.weight_decay == 0.1
    assert t.max_steps == 19073 and t.precision == "bf16-mixed" and t.gradient_clip_val == 1.0
    assert cfg.val_every_n_steps == 250 and m.gpt.name == "gpt2_124m"


def test_caption_recipe():
    cfg = compose_cfg("experiment=caption_coco2017")
    m = cfg.model
    assert cfg.data.batch_size == 32 and cfg.trainer.precision == "bf16-mixed"
    assert (m.optim.lr, m.optim.warmup_steps) == (1e-4, 500)
    assert m.cross_every == 2 and list(m.trainable) == ["xattn", "projection"]
    assert m.vision.clip == "openai/clip-vit-base-patch32"


def test_bad_override_is_a_clear_error():
    with pytest.raises(Exception, match="no_such_experiment"):
        compose_cfg("experiment=no_such_experiment")


def test_fsdp_wraps_each_transformer_block():
    import hydra
    from lightning.pytorch.strategies import FSDPStrategy

    from captioner.models.gpt import Block

    cfg = compose_cfg("experiment=pretrain_gpt2_124m", "trainer=fsdp")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert strategy.kwargs[
        "use_orig_params"
    ]  # torch.compile and our parameter groups need the original params
