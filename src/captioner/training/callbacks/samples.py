"""Text samples from the language model at each validation, appended to <run_dir>/samples.txt (stage 1)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch

from captioner.models.generate import decode_loop, sampler
from captioner.tokenizer import EOT, decode, gpt2_encoding

log = logging.getLogger(__name__)


class TextSamplesCallback(pl.Callback):
    """Continue each prompt with top-k sampling from a fixed seed (so samples of successive validations differ only
    because the model changed) and append them, headed by the step, to <default_root_dir>/samples.txt. Rank zero;
    the module must hold its GPT as `pl_module.model`."""

    def __init__(
        self,
        prompts: list[str] = ("Hello, I'm a language model,",),
        max_new_tokens: int = 32,
        top_k: int = 50,
        seed: int = 42,
        filename: str = "samples.txt",
    ):
        super().__init__()
        self.prompts, self.max_new_tokens, self.top_k = list(prompts), max_new_tokens, top_k
        self.seed, self.filename = seed, filename

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.prompts:
            return
        samples = self.sample(pl_module)
        log.info("samples at step %d:\n%s", trainer.global_step, "\n".join(samples))
        lines = [f"## step {trainer.global_step}", *samples]
        with open(
            Path(trainer.default_root_dir) / self.filename, "a"
        ) as f:  # append-only: a torn line loses nothing else
            f.write("\n".join(lines) + "\n")

    def sample(self, pl_module: pl.LightningModule) -> list[str]:
        """One repr'd continuation per prompt."""
        enc = gpt2_encoding()
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        pick = sampler(top_k=self.top_k, generator=generator)
        was_training = pl_module.training
        pl_module.eval()
        out = []
        with pl_module.eval_context():
            for prompt in self.prompts:
                idx = torch.tensor([[EOT, *enc.encode(prompt)]], device=pl_module.device)
                new = decode_loop(
                    pl_module.model, idx, pick, max_new_tokens=self.max_new_tokens, eot=EOT
                )  # (1, n)
                out.append(repr(decode(idx[0, 1:].tolist() + new[0].tolist())))
        pl_module.train(was_training)
        return out
