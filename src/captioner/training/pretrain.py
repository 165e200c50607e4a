"""Stage 1: GPT-2 language-model pretraining (build-nanogpt's recipe as a LightningModule)."""

from __future__ import annotations

import dataclasses

import torch

from captioner.data.hellaswag import load_examples
from captioner.eval.hellaswag import score_hellaswag
from captioner.models.compact_vocab import build_lm, lm_config
from captioner.training.base import TrainingModule


class PretrainModule(TrainingModule):
    """GPT-2 with the LM loss. Validation: loss on a fixed val slice, HellaSwag acc/acc_norm (text samples: TextSamplesCallback).

    Hyper-parameters are plain data only (`gpt` is the resolved config as a dict: a GPTConfig's, or a
    CompactVocabConfig's for an LM over a compact vocabulary), so checkpoints load with
    `torch.load(weights_only=True)` and `compact_vocab.lm_config` + `build_lm` rebuild the LM from them.
    """

    def __init__(
        self,
        gpt: dict | str = "gpt2_124m",
        optim: dict | None = None,
        compile: bool = False,
        hellaswag: dict | None = None,
    ):
        super().__init__(optim)
        config = lm_config(gpt)
        self.save_hyperparameters(
            {
                "gpt": dataclasses.asdict(config),
                "optim": dataclasses.asdict(self.optim_cfg),
                "compile": compile,
                "hellaswag": dict(hellaswag or {}),
            }
        )
        self.model = build_lm(config)
        self._num_params = self.model.num_params()  # for MFU, counted before FSDP shows only a shard of each
        self.compile_model = compile
        self._compiled = None  # not a submodule: keeps state-dict keys free of `_orig_mod`
        self._hellaswag_examples = None

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def flops_per_batch(self, batch) -> float:
        """Training FLOPs of one micro-batch (ThroughputCallback's MFU): everything trains, so 6N + attention
        per token (`GPT.flops_per_token`) at the batch's own sequence length."""
        x, _ = batch  # (B, T)
        return self.model.flops_per_token(x.size(1), num_params=self._num_params) * x.numel()

    def configure_model(self) -> None:
        if self.compile_model and self._compiled is None:
            # Only the training forward is compiled: fixed (B, T) shapes; evaluation and sampling stay eager.
            object.__setattr__(self, "_compiled", torch.compile(self.model))

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T) int64 each
        forward = self._compiled if self._compiled is not None else self.model
        _, loss = forward(x, y, return_logits=False)  # the output layer fused with the loss (models/loss.py)
        self.accumulate_loss(loss, x.numel())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y, return_logits=False)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        with self.eval_context():
            self._run_hellaswag()

    # --- evaluation helpers -------------------------------------------------------------------------------
    def _run_hellaswag(self) -> None:
        cfg = self.hparams.hellaswag
        if not cfg.get("path"):
            return
        if self._hellaswag_examples is None:
            self._hellaswag_examples = load_examples(cfg["path"], limit=cfg.get("limit"))
        counts = score_hellaswag(
            self.model,
            self._hellaswag_examples,
            batch_size=cfg.get("batch_size", 16),
            device=self.device,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
        )
        n = max(1, counts["n"])
        # Counts are already summed over ranks, so every rank logs the same value (no sync needed).
        self.log("val/hellaswag_acc", counts["correct"] / n)
        self.log("val/hellaswag_acc_norm", counts["correct_norm"] / n)
