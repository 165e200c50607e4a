"""Stage 1: GPT-2 language-model pretraining (build-nanogpt's recipe as a LightningModule)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from captioner.models.gpt import GPT, GPTConfig
from captioner.modules.common import TrainingModule

log = logging.getLogger(__name__)


def resolve_gpt_config(model: dict | str) -> GPTConfig:
    """`{"name": "gpt2_124m", **overrides}`, a bare name, or explicit GPTConfig fields."""
    if isinstance(model, str):
        return GPTConfig.named(model)
    model = dict(model)
    name = model.pop("name", None)
    return GPTConfig.named(name, **model) if name else GPTConfig(**model)


class PretrainModule(TrainingModule):
    """GPT-2 with the LM loss. Validation: loss on a fixed val slice, HellaSwag acc/acc_norm, text samples.

    Hyper-parameters are plain data only (`model` is the resolved GPTConfig as a dict), so checkpoints load with
    `torch.load(weights_only=True)` and `GPT.from_lightning_checkpoint` can rebuild the LM from them.
    """

    def __init__(
        self,
        model: dict | str = "gpt2_124m",
        optim: dict | None = None,
        compile: bool = False,
        hellaswag: dict | None = None,
        samples: dict | None = None,
    ):
        super().__init__(optim)
        config = resolve_gpt_config(model)
        self.save_hyperparameters(
            {
                "model": dataclasses.asdict(config),
                "optim": dataclasses.asdict(self.optim_cfg),
                "compile": compile,
                "hellaswag": dict(hellaswag or {}),
                "samples": dict(samples or {}),
            }
        )
        self.model = GPT(config)
        self.compile_model = compile
        self._compiled = None  # not a submodule: keeps state-dict keys free of `_orig_mod`
        self._hellaswag_examples = None

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def flops_per_token(self) -> float:
        return self.model.flops_per_token()

    def configure_model(self) -> None:
        if self.compile_model and self._compiled is None:
            # Only the training forward is compiled: fixed (B, T) shapes; evaluation and sampling stay eager.
            object.__setattr__(self, "_compiled", torch.compile(self.model))

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T) int64 each
        forward = self._compiled if self._compiled is not None else self.model
        _, loss = forward(x, y)
        self.accumulate_loss(loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        _, loss = self.model(x, y)
        self.log("val/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        with self.eval_context():
            self._run_hellaswag()
            self._write_samples()

    # --- evaluation helpers -------------------------------------------------------------------------------
    def _run_hellaswag(self) -> None:
        cfg = self.hparams.hellaswag
        if not cfg.get("path"):
            return
        from captioner.data.hellaswag import load_examples
        from captioner.eval.hellaswag import score_hellaswag

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

    def _write_samples(self) -> None:
        cfg = self.hparams.samples
        prompts = cfg.get("prompts") or []
        if not prompts or not self.trainer.is_global_zero:
            return
        from captioner.tokenizer import EOT, gpt2_encoding

        enc = gpt2_encoding()
        generator = torch.Generator(device=self.device).manual_seed(cfg.get("seed", 42))
        lines = [f"## step {self.global_step}"]
        for prompt in prompts:
            idx = torch.tensor([[EOT, *enc.encode(prompt)]], device=self.device)
            out = self.model.generate(
                idx,
                max_new_tokens=cfg.get("max_new_tokens", 32),
                top_k=cfg.get("top_k", 50),
                generator=generator,
                eot=EOT,
            )
            text = enc.decode([t for t in out[0, 1:].tolist() if t < enc.n_vocab and t != EOT])
            lines.append(f"{text!r}")
        log.info("samples at step %d:\n%s", self.global_step, "\n".join(lines[1:]))
        run_dir = Path(self.trainer.default_root_dir)
        with open(run_dir / "samples.txt", "a") as f:  # append-only log; a torn last line loses nothing else
            f.write("\n".join(lines) + "\n")
