"""Stage 3: self-critical sequence training (Rennie et al., CVPR 2017), the caption field's last stage: after
cross-entropy, optimise CIDEr-D itself with REINFORCE.

Per image, k captions are sampled (multinomial, temperature 1, in one batched decode with the KV cache) and
scored by CIDEr-D against the image's training references, document frequencies from the whole training split
(eval/cider.py). Each sample's advantage is its reward minus a baseline: the mean reward of the image's other
k - 1 samples ("new self-critical", Luo 2020, arXiv:2003.09971; the default) or the reward of the greedy caption
(Rennie 2017). The reward reads a caption's closing EOT as a word, in samples and references alike (SacreEOS's
"with EOS"; Hu et al. 2023 measured up to +4.1 CIDEr-D for models that drop it, from trivial fragments), and
the loss, -(r - b) · log p(sample) averaged over the sampled tokens, includes it: when to stop is part of the
caption. Validation, checkpoints, the non-finite guard, logging and the gallery are the
caption stage's (`CaptionModule`); the weights start from a cross-entropy caption run (`init_ckpt`: not a resume,
a fresh optimizer and schedule).

Shapes: B images, k samples per image, M = B·k sequences, T the longest sample + 1, N image tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from captioner.errors import UserError
from captioner.eval.cider import CiderD
from captioner.models import generate as decoding
from captioner.models.captioner import CAPTIONER_KEYS
from captioner.models.gpt import load_checkpoint
from captioner.tokenizer import EOT
from captioner.training.caption import CaptionModule

log = logging.getLogger(__name__)

BASELINES = ("mean", "greedy")


def caption_run_hparams(path: str) -> dict:
    """The hyper-parameters of a caption run's checkpoint: what the self-critical run is built from."""
    hparams = load_checkpoint(path).get("hyper_parameters") or {}
    if not all(key in hparams for key in CAPTIONER_KEYS):
        raise UserError(
            f"model.init_ckpt={path}: not a caption run's checkpoint (hyper_parameters need "
            f"{', '.join(CAPTIONER_KEYS)}); pass the last.ckpt of a cross-entropy caption run"
        )
    return hparams


class SelfCriticalModule(CaptionModule):
    """CIDEr-D optimised with REINFORCE, starting from the caption run at `init_ckpt`.

    samples: k captions sampled per image; baseline: "mean" (the other samples' mean reward) or "greedy";
    temperature: of the sampling; max_new_tokens: sample length (default: the caption run's
    generation.max_new_tokens). trainable, generation: default to the caption run's; optim, scorers,
    attention_images: as in CaptionModule.
    """

    def __init__(
        self,
        init_ckpt: str,
        samples: int = 5,
        baseline: str = "mean",
        temperature: float = 1.0,
        max_new_tokens: int | None = None,
        trainable: list[str] | None = None,
        generation: dict | None = None,
        optim: dict | None = None,
        scorers: dict | None = None,
        attention_images: int = 0,
    ):
        if baseline not in BASELINES:
            raise UserError(f"model.baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
        if samples < 1 + (baseline == "mean"):
            raise UserError(f"model.samples={samples}: the mean baseline needs at least 2 samples per image")
        if not temperature > 0:
            raise UserError(f"model.temperature must be > 0, got {temperature!r}")
        xe = caption_run_hparams(init_ckpt)
        generation = dict(xe.get("generation") or {}) if generation is None else generation
        super().__init__(
            lm=xe["lm"],
            vision=xe["vision"],
            cross_every=xe["cross_every"],
            trainable=xe["trainable"] if trainable is None else trainable,
            optim=optim,
            generation=generation,
            scorers=scorers,
            attention_images=attention_images,
        )
        max_new_tokens = max_new_tokens or generation.get("max_new_tokens", 30)
        self.hparams.update(
            {
                "init_ckpt": str(init_ckpt),
                "scst": {
                    "samples": samples,
                    "baseline": baseline,
                    "temperature": float(temperature),
                    "max_new_tokens": int(max_new_tokens),
                },
            }
        )
        self.cider: CiderD | None = None  # the reward; built at fit start from the training references
        self._teacher_forced: tuple[torch.Tensor, torch.Tensor] | None = None

    def load_pretrained(self) -> None:
        """The caption run's weights, all of them (a fresh run only; a resumed one restores its own)."""
        state = load_checkpoint(self.hparams.init_ckpt).get("state_dict") or {}
        weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(weights)
        log.info("captioner loaded from %s", self.hparams.init_ckpt)

    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if not getattr(datamodule, "hparams", {}).get("train_references"):
            raise UserError(
                "self-critical training needs data.train_references=true (the reward's references)"
            )
        corpus, digest = datamodule.reference_corpus()
        hp = datamodule.hparams
        cache = Path(hp.root) / "annotations" / f"cider_df_{hp.train_split}_{digest}.npz"
        if cache.is_file():
            self.cider = CiderD.load(cache)
        else:
            log.info(
                "CIDEr-D document frequencies of %d training images (once; cached in %s)", len(corpus), cache
            )
            self.cider = CiderD.from_corpus(corpus)
            if self.trainer.is_global_zero:
                self.cider.save(cache)

    # --- the step -----------------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        self._count_skipped(batch)
        if batch["input_ids"].shape[0] == 0:
            loss = self._loss(batch)  # every image unreadable: CaptionModule's zero loss
            self.accumulate_loss(loss, 1)
            return loss
        cfg = self.hparams.scst
        key = "features" if "features" in batch else "pixel_values"
        context = self.model.image_context(**{key: batch[key]})  # (B, N, C)
        B, k = context.size(0), cfg["samples"]
        group = np.repeat(np.arange(B), k)  # (M,) the image of each sample
        contexts = context.repeat_interleave(k, dim=0)  # (M, N, C)
        samples = self._decode(contexts, decoding.sampler(temperature=cfg["temperature"]))
        rewards = self.cider(self._ended(samples), batch["references"], group)  # (M,)
        if cfg["baseline"] == "mean":
            per_image = rewards.reshape(B, k).sum(axis=1, keepdims=True)
            baseline = ((per_image - rewards.reshape(B, k)) / (k - 1)).reshape(-1)
        else:
            greedy = self._decode(context, decoding.argmax)
            baseline = self.cider(self._ended(greedy), batch["references"])[group]
        advantage = rewards - baseline  # (M,) numpy, on the host like the rewards: logging it reads no device
        log_probs, rows = self._sample_log_probs(samples, contexts)  # (R,), (R,) sample of each token
        weights = torch.as_tensor(advantage, dtype=torch.float32).to(context.device, non_blocking=True)
        loss = -(weights[rows] * log_probs).mean()
        self.accumulate_loss(loss, len(rows))
        self.log("train/reward", float(rewards.mean()), batch_size=B)
        self.log(
            "train/advantage_std", float(advantage.std(ddof=1)) if len(advantage) > 1 else 0.0, batch_size=B
        )
        self.log("train/sample_len", float(np.mean([len(s) for s in samples])), batch_size=B)
        return loss

    @torch.no_grad()
    def _decode(self, context: torch.Tensor, pick) -> list[list[int]]:
        prompt = torch.full((context.size(0), 1), EOT, dtype=torch.long, device=context.device)  # (M, 1)
        return decoding.generate(
            self.model.lm,
            prompt,
            pick,
            max_new_tokens=self.hparams.scst["max_new_tokens"],
            eot=EOT,
            context=context.detach(),
        )

    def _ended(self, samples: list[list[int]]) -> list[list[int]]:
        """Samples with the EOT that ended them (one that stopped before the limit emitted it)."""
        limit = self.hparams.scst["max_new_tokens"]
        return [[*s, EOT] if len(s) < limit else s for s in samples]

    def _sample_log_probs(self, samples: list[list[int]], contexts: torch.Tensor):
        """log p of every sampled token under the model, with gradients: one teacher-forced pass over
        [EOT] + sample, the closing EOT a target too where the sample emitted it."""
        targets = self._ended(samples)
        M, T = len(samples), max(1, max(len(t) for t in targets))
        input_ids = torch.full((M, T), EOT, dtype=torch.long)  # (M, T)
        labels = torch.full((M, T), -100, dtype=torch.long)  # (M, T)
        for m, (sample, target) in enumerate(zip(samples, targets, strict=True)):
            input_ids[m, 1 : 1 + len(sample[: T - 1])] = torch.tensor(sample[: T - 1], dtype=torch.long)
            labels[m, : len(target)] = torch.tensor(target, dtype=torch.long)
        input_ids, labels = input_ids.to(contexts.device), labels.to(contexts.device)
        self._teacher_forced = (input_ids, labels)
        x = self.model.lm.hidden_states(input_ids, context=contexts)  # (M, T, C)
        keep = (labels != -100).view(-1).nonzero().squeeze(1)  # (R,)
        log_probs = self.model.lm.token_log_probs(x.view(-1, x.size(-1))[keep], labels.view(-1)[keep])  # (R,)
        return log_probs, keep // T

    def flops_per_batch(self, batch) -> torch.Tensor:
        """The teacher-forced pass over the last step's samples (as CaptionModule counts a caption batch) plus
        CLIP on the batch's pixels; the sampling's forward passes are not counted (MFU is a lower bound)."""
        if self._teacher_forced is None:
            return super().flops_per_batch(batch)
        input_ids, labels = self._teacher_forced
        flops = super().flops_per_batch({"input_ids": input_ids, "labels": labels})
        if "pixel_values" in batch:
            terms, N = self._flops_terms, self.model.vision.num_tokens
            flops = flops + len(batch["pixel_values"]) * N * (terms["clip"] + terms["clip_attn"] * N)
        return flops
