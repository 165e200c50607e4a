"""`captioner-train experiment=NAME [overrides…]`: compose the config, build everything from it, fit."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.accelerators import CPUAccelerator
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from captioner.cli.boundary import error_boundary
from captioner.data.feature_cache import check_cache_fits
from captioner.data.hellaswag import load_examples
from captioner.errors import UserError, check_types
from captioner.models.gpt import load_checkpoint
from captioner.optim import parameter_counts
from captioner.training.base import DivergedError
from captioner.training.callbacks.plots import plot_metrics
from captioner.training.caption import CaptionModule
from captioner.training.loggers import truncate_metrics_after

log = logging.getLogger("captioner.train")
LIGHTNING_INFO = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
# Lightning advertises its hosted logger at every fit; the run's own lines are what the terminal is for.
for _name in LIGHTNING_INFO:
    logging.getLogger(_name).addFilter(lambda record: not str(record.msg).startswith("💡 Tip"))

# The repository's top-level configs/, reached through the package's `configs` link in a checkout (editable
# install) and carried inside the package by the wheel: one lookup for both.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers), skipping nulls."""
    if not group:
        return []
    return [hydra.utils.instantiate(c, _convert_="all") for c in group.values() if c is not None]


def derive_step_settings(cfg: DictConfig, datamodule) -> dict:
    """The Trainer arguments that follow from the rest of the config, for the Trainer's constructor: accumulation
    from the batch recipe and the world size; the validation cadence in optimizer steps."""
    probe = probe_trainer(cfg)
    accum = probe.accumulate_grad_batches  # the configured one, or Lightning's default
    if hasattr(datamodule, "grad_accum_steps"):
        derived = datamodule.grad_accum_steps(probe.world_size)
        if "accumulate_grad_batches" in cfg.trainer and accum != derived:
            raise UserError(
                f"trainer.accumulate_grad_batches={accum} contradicts data.total_batch_tokens (which gives "
                f"{derived} at world size {probe.world_size}); set one"
            )
        accum = derived
    # Loaders are endless streams, so Lightning counts validation intervals in micro-batches.
    return {"accumulate_grad_batches": accum, "val_check_interval": cfg.val_every_n_steps * accum}


def probe_trainer(cfg: DictConfig) -> L.Trainer:
    """A Trainer of cfg.trainer built only to be asked what Lightning makes of it: the world size follows from
    devices and num_nodes, and under torchrun or SLURM from the cluster environment. No loggers, no callbacks;
    its device lines stay unprinted (the Trainer that runs prints them)."""
    quiet = dict(
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        return L.Trainer(**{**trainer_arguments(cfg), **quiet})
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def build_module(model: DictConfig) -> L.LightningModule:
    """The LightningModule of `model._target_`, given plain data: nested `_target_`s (caption scorers) stay
    configs for the module to build, so its hyper-parameters remain plain data."""
    kwargs = OmegaConf.to_container(model, resolve=True)
    return hydra.utils.get_class(kwargs.pop("_target_"))(**kwargs)


def check_inputs(cfg: DictConfig, datamodule: L.LightningDataModule) -> int | None:
    """Everything a run reads that can be checked before the model is built and the loggers start: the data
    (shards, annotations, images), the feature cache, the HellaSwag file, the checkpoint to resume
    (whose global step it returns, None for a fresh run)."""
    datamodule.setup("fit")
    features_dir = cfg.data.get("features_dir")
    if features_dir:
        check_cache_fits(
            features_dir,
            cfg.data.train_split,
            clip=cfg.model.vision.get("clip"),
            trainable=cfg.model.trainable,
        )
    check_accelerator(cfg.trainer)
    hellaswag = cfg.model.get("hellaswag") or {}
    if hellaswag.get("path"):
        load_examples(hellaswag.path, limit=hellaswag.get("limit"))
    if cfg.ckpt_path:
        caption = issubclass(hydra.utils.get_class(cfg.model._target_), CaptionModule)  # stage 2 or 3
        return check_resume_checkpoint(cfg.ckpt_path, caption=caption)
    return None


def check_accelerator(trainer: DictConfig) -> None:
    """A GPU trainer config (trainer=gpu/ddp/fsdp) on a machine without CUDA: say so before Lightning does."""
    if trainer.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(
            f"trainer.accelerator={trainer.accelerator} (strategy {strategy_name(trainer)}) but this machine has no "
            "CUDA GPU; use trainer=cpu (or trainer.accelerator=cpu with strategy ddp). FSDP needs GPUs: Lightning's "
            "FSDPStrategy refuses the CPU (Lightning-AI/pytorch-lightning#21812)"
        )


def strategy_name(trainer: DictConfig) -> str:
    strategy = trainer.get("strategy")
    return (
        strategy.get("_target_", "?").rsplit(".", 1)[-1]
        if isinstance(strategy, DictConfig)
        else str(strategy)
    )


def trainer_arguments(cfg: DictConfig) -> dict:
    """cfg.trainer as the Trainer's keyword arguments; a `strategy` given as a config with `_target_`
    (trainer=fsdp's wrap policy) is instantiated."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(kwargs.get("strategy"), dict):
        kwargs["strategy"] = hydra.utils.instantiate(cfg.trainer.strategy)
    return kwargs


def check_resume_checkpoint(path: str, caption: bool) -> int:
    """`ckpt_path` must be a checkpoint of the same stage as the run; returns its global step."""
    ckpt = load_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    if caption and "lm" not in hparams:
        raise UserError(
            f"ckpt_path={path} is a stage-1 (language model) checkpoint, not a caption run's: to start a caption "
            f"run from it use model.lm.ckpt={path} (ckpt_path resumes a caption run)"
        )
    if not caption and "lm" in hparams:
        raise UserError(f"ckpt_path={path} is a caption run's checkpoint; this is a stage-1 (pretrain) run")
    return int(ckpt["global_step"])


def log_run_config(trainer: L.Trainer, cfg: DictConfig, derived: dict) -> None:
    """Send what actually runs to every logger: the resolved config, its trainer section with the arguments
    captioner-train derived (`derived`), and the world size."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    run = {"experiment": choices.get("experiment", cfg.get("name")), "world_size": trainer.world_size}
    config = OmegaConf.to_container(cfg, resolve=True)
    config["trainer"].update(derived)
    for logger in trainer.loggers:
        logger.log_hyperparams({"run": run, "config": config})


def keep_freed_memory() -> None:
    """Training on a CPU: glibc hands every block over 32 MB back to the kernel when it is freed (mmap/munmap), so
    each step page-faults its logits and activations in afresh; on the demo model the kernel zeroing pages took
    half of every step (800k page faults). Serving every block from the heap and not trimming it keeps freed memory
    for the next step: the process holds its peak, as CUDA's caching allocator does. glibc only. It changes the
    whole process for good, so captioner-train asks for it (KeepFreedMemory) and train() alone never does."""
    if platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)  # an int: 2 GiB of free heap top before any is returned


class KeepFreedMemory(L.Callback):
    """keep_freed_memory() in each process of a run whose accelerator is the CPU, as Lightning resolved
    trainer.accelerator (`auto` included)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(trainer.accelerator, CPUAccelerator):
            keep_freed_memory()


def cli_callbacks(cfg: DictConfig) -> list:
    """What captioner-train adds to a run beyond train(cfg): the process-wide settings the config asks for."""
    return [KeepFreedMemory()] if cfg.keep_freed_memory else []


@dataclass
class RunSettings:
    """The root config's own keys (configs/train.yaml), for their types."""

    seed: int
    ckpt_path: str | None
    val_every_n_steps: int
    ckpt_every_n_steps: int
    ckpt_keep_every_n_steps: int | None
    validate_at_start: bool
    validate_at_end: bool
    keep_freed_memory: bool


def check_config_types(cfg: DictConfig) -> None:
    """A value of the wrong type for a key a run reads (`trainer.max_steps=ten`) as one line naming the key."""
    check_types(RunSettings, {f.name: cfg.get(f.name) for f in dataclasses.fields(RunSettings)}, "")
    check_types(L.Trainer, OmegaConf.to_container(cfg.trainer, resolve=True), "trainer")
    for group in ("data", "model"):
        try:
            kwargs = OmegaConf.to_container(cfg[group], resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:  # a `???` in the config: a value only the user can give
            raise UserError(f"{err.full_key} is required: add {err.full_key}=… to the command") from None
        check_types(hydra.utils.get_class(kwargs.pop("_target_")), kwargs, group)


def train(cfg: DictConfig, callbacks: list | None = None) -> dict:
    """Fit (and finally validate) the configured module; returns the last logged metrics. `callbacks` run after
    the configured ones (a benchmark's step clock)."""
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere+ for whatever runs outside autocast
    run_dir = Path(cfg.paths.run_dir)
    check_config_types(cfg)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    resume_step = check_inputs(cfg, datamodule)
    derived = derive_step_settings(cfg, datamodule)
    module = build_module(cfg.model)
    loggers = instantiate_all(cfg.get("logger"))
    if cfg.ckpt_path:
        truncate_metrics_after(loggers, resume_step)
    callbacks = instantiate_all(cfg.get("callbacks")) + list(callbacks or [])
    trainer = L.Trainer(**{**trainer_arguments(cfg), **derived}, logger=loggers, callbacks=callbacks)
    log_run_config(trainer, cfg, derived)
    log.info(
        "run dir %s | world size %d | accumulation %d",
        run_dir,
        trainer.world_size,
        trainer.accumulate_grad_batches,
    )
    if not cfg.ckpt_path and hasattr(module, "load_pretrained"):
        module.load_pretrained()  # fresh run: stage-1 LM / CLIP weights (a resumed run restores its own)
    log.info("parameters: {trainable:,} trainable, {frozen:,} frozen".format(**parameter_counts(module)))
    if (
        cfg.validate_at_start and not cfg.ckpt_path
    ):  # the curves start at the untrained model, as build-nanogpt's
        trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if cfg.validate_at_end and trainer.global_step % cfg.val_every_n_steps != 0:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if trainer.is_global_zero:
        _refresh_plots(trainer, run_dir)
        _print_summary(trainer, run_dir)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _refresh_plots(trainer: L.Trainer, run_dir: Path) -> None:
    for logger in trainer.loggers:
        logger.save()
    if (run_dir / "metrics.csv").exists():
        plot_metrics(run_dir / "metrics.csv", run_dir / "plots")


def _print_summary(trainer: L.Trainer, run_dir: Path) -> None:
    metrics = {k: round(float(v), 4) for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1}
    print(f"\nrun dir:     {run_dir}")
    print(f"checkpoint:  {run_dir / 'checkpoints' / 'last.ckpt'}")
    print(f"plots:       {run_dir / 'plots'}")
    print(f"metrics:     {metrics}")


def experiments() -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    if HydraConfig.get().runtime.choices.get("experiment") is None:
        print(
            "captioner-train: choose an experiment: captioner-train experiment=NAME [overrides…]\n"
            f"  experiments: {', '.join(experiments())}   (captioner-train --help lists every option)",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        with error_boundary("captioner-train", also=(OmegaConfBaseException,)):
            train(cfg, callbacks=cli_callbacks(cfg))
    except DivergedError as err:  # not a mistake but an outcome: the run stopped, its last good weights kept
        print(f"captioner-train: {err}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hydra_main()


if __name__ == "__main__":
    main()
