"""What both LightningModules share: exact-resume RNG state, grad-norm logging, the optimizer recipe."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel

from captioner.errors import check_types
from captioner.optim import make_adamw, parameter_counts, warmup_cosine_schedule


@dataclass
class OptimConfig:
    """AdamW + warmup-cosine; the defaults are stage 1's recipe (build-nanogpt)."""

    lr: float = 6e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 715
    max_steps: int = 19073
    min_lr_ratio: float = 0.1
    gate_lr_mult: float = 1.0  # lr multiplier of the cross-attention gates (stage 2)
    max_skipped_steps: int = 3  # consecutive non-finite steps (each skipped) before the run stops

    def __post_init__(self):
        check_types(OptimConfig, dataclasses.asdict(self), "model.optim")


class DivergedError(RuntimeError):
    """Training stopped: too many consecutive optimizer steps had a non-finite loss or gradient norm."""


def rng_state() -> dict:
    """Every RNG a step may draw from, as plain tensors/lists (loads with weights_only=True)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": random.getstate(),  # (version, tuple of ints, gauss): plain data
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingModule(L.LightningModule):
    """Base for both stages: owns the optimizer recipe, logs lr and the pre-clip gradient norm once per optimizer
    step, logs the accumulation-averaged train loss (as build-nanogpt prints it), and checkpoints RNG state.

    Non-finite guard: an optimizer step whose loss or gradient norm is not finite (on any rank) is skipped — AdamW
    leaves weights, moments and step count untouched — and counted (`train/skipped_steps`); after
    `optim.max_skipped_steps` such steps in a row the run stops with DivergedError. Weights therefore never take a
    non-finite update, and every checkpoint holds the last good ones.

    The training step never waits for the device: the verdict is a device tensor. A fused AdamW (CUDA) skips on
    the device through its `found_inf` input (as under GradScaler); another optimizer reads the verdict on the
    host and drops the gradients (free on a CPU). The host learns a fused step's verdict one step later, so a
    diverging GPU run stops one step after the limit (that step's update is skipped as well). Under DDP the loss
    is averaged over ranks with one collective without a barrier, and the gradient norm is the same on every
    rank, so every rank takes the same decision with no further communication.
    """

    def __init__(self, optim: dict | None = None):
        super().__init__()
        self.optim_cfg = OptimConfig(**(optim or {}))
        self._loss_sum = 0.0
        self._loss_count = 0
        self._step_loss: torch.Tensor | None = (
            None  # this optimizer step's loss, averaged over micro-batches and ranks
        )
        self._verdict: tuple | None = (
            None  # (skipped?, its device event, step) of the last step, not yet counted
        )
        self._skipped_total = 0
        self._skipped_in_a_row = 0
        self._verdict_step = 0
        self._tokens_seen = 0  # all ranks, whole run: an x-axis comparable across batch sizes and resumes

    def trainable_module(self) -> torch.nn.Module:
        raise NotImplementedError

    def configure_optimizers(self):
        c = self.optim_cfg
        opt = make_adamw(
            self.trainable_module(),
            lr=c.lr,
            weight_decay=c.weight_decay,
            betas=c.betas,
            eps=c.eps,
            gate_lr_mult=c.gate_lr_mult,
        )
        sched = warmup_cosine_schedule(
            opt, warmup_steps=c.warmup_steps, max_steps=c.max_steps, min_lr_ratio=c.min_lr_ratio
        )
        return {"optimizer": opt, "lr_scheduler": sched}

    def accumulate_loss(self, loss: torch.Tensor, tokens: int) -> None:
        """One micro-batch's loss, and its `tokens` (input positions) for the tokens-seen axis."""
        self._loss_sum = self._loss_sum + loss.detach()
        self._loss_count += 1
        trainer = self._attached_trainer()
        self._tokens_seen += tokens * (trainer.world_size if trainer is not None else 1)

    def on_before_optimizer_step(self, optimizer) -> None:
        self._step_loss = None
        if self._loss_count:
            self._step_loss = self._mean_over_ranks(self._loss_sum / self._loss_count)
            self.log("train/loss", self._step_loss, on_step=True)
        self._loss_sum, self._loss_count = 0.0, 0
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True)
        self.log("train/tokens_seen", float(self._tokens_seen), on_step=True)

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        # Not `self.log(sync_dist=True)`: Lightning puts a barrier before its all-reduce, a host sync every step.
        trainer = self._attached_trainer()
        if trainer is None or trainer.world_size == 1 or not dist.is_initialized():
            return value
        value = value.detach().clone()
        dist.all_reduce(value)  # SUM: AVG is NCCL-only
        return value / trainer.world_size

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Log the total norm before clipping, as build-nanogpt prints it; clip only when configured.
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        if self._is_fsdp():
            # Sharded gradients: FSDP's own method reduces the shard norms into the global norm.
            norm = self.trainer.strategy.model.clip_grad_norm_(max_norm)
        else:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.log("train/grad_norm", norm, on_step=True)
        self._guard_nonfinite(optimizer, norm)

    def _guard_nonfinite(self, optimizer, norm: torch.Tensor) -> None:
        self._count_verdict()  # the previous step's, if it was left on the device
        self._stop_if_diverged()
        skip = ~torch.isfinite(norm)
        if self._step_loss is not None:
            skip = skip | ~torch.isfinite(self._step_loss)
        verdict, event = skip, None
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = skip.float()  # the fused kernel skips the whole update on the device
            if skip.is_cuda:
                # the verdict comes to the host with the step's other work; counted at the next step
                verdict = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(skip, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
        elif bool(skip):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None  # AdamW skips parameters without a gradient: no update, no moment change
        self.log("train/skipped_steps", self._skipped_total + skip.float(), on_step=True)
        self._verdict = (verdict, event, self.global_step + 1)
        if event is None:
            self._count_verdict()
            self._stop_if_diverged()

    def _count_verdict(self) -> None:
        if self._verdict is None:
            return
        skip, event, self._verdict_step = self._verdict
        self._verdict = None
        if event is not None:
            event.synchronize()  # recorded a step ago: normally long done
        if bool(skip):
            self._skipped_total += 1
            self._skipped_in_a_row += 1
        else:
            self._skipped_in_a_row = 0

    def _stop_if_diverged(self) -> None:
        if self._skipped_in_a_row >= self.optim_cfg.max_skipped_steps:
            raise DivergedError(self._diverged_message())

    def on_train_end(self) -> None:
        self._count_verdict()
        self._stop_if_diverged()

    def _diverged_message(self) -> str:
        step = self._verdict_step  # the last skipped optimizer step
        trainer = self._attached_trainer()
        callbacks = trainer.checkpoint_callbacks if trainer is not None else []
        last = next((cb.last_model_path for cb in callbacks if cb.last_model_path), None)
        return (
            f"step {step}: the loss or gradient norm was not finite for {self._skipped_in_a_row} optimizer steps in "
            f"a row (each skipped, weights untouched); stopping. Last good checkpoint: {last or 'none saved yet'}. "
            "Lower model.optim.lr (or raise model.optim.warmup_steps) and resume with ckpt_path=<that checkpoint>."
        )

    def on_fit_start(self) -> None:
        counts = parameter_counts(self)
        for logger in self.loggers:
            logger.log_hyperparams({f"params/{k}": v for k, v in counts.items()})

    # --- evaluation outside *_step hooks (HellaSwag, sampling, captioning) --------------------------------------
    def _attached_trainer(self) -> L.Trainer | None:
        """The Trainer running this module, or None (a hook called without one, as unit tests do)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's "is not attached to a `Trainer`"
            return None

    def _is_fsdp(self) -> bool:
        return isinstance(getattr(self._attached_trainer(), "strategy", None), FSDPStrategy)

    @contextlib.contextmanager
    def eval_context(self):
        """Evaluation code in epoch-end hooks gets what `validation_step` gets from Lightning: the configured
        autocast (bf16-mixed) and, under FSDP, the full (unsharded) parameters."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self._attached_trainer() is not None:
                stack.enter_context(self.trainer.precision_plugin.forward_context())
                if self._is_fsdp():
                    stack.enter_context(
                        FullyShardedDataParallel.summon_full_params(
                            self.trainer.strategy.model, writeback=False
                        )
                    )
            yield

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._count_verdict()
        checkpoint["rng_state"] = rng_state()
        checkpoint["skipped_steps"] = self._skipped_total
        checkpoint["tokens_seen"] = self._tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])
        self._skipped_total = int(checkpoint.get("skipped_steps", 0))
        self._tokens_seen = int(checkpoint.get("tokens_seen", 0))
