"""Stage 2: a pretrained GPT-2 reads a frozen CLIP's image tokens through gated cross-attention.

Validation has two loaders (see `CocoCaptionDataModule.val_dataloader`): caption pairs for the loss, and a fixed
set of images whose generated captions the configured scorers grade (BLEU/METEOR/ROUGE-L/CIDEr-D by default; the
shapes demo adds object accuracy and pointing accuracy). The module keeps the predictions and scores of its last
validation (`val_predictions`, `val_scores`) for the callbacks that show them (gallery, wandb table).

Attention maps (`captioner.models.attention_maps`) cost one more teacher-forced pass per caption, a large share of
greedy decoding at real size (README), so validation computes them only where they are used: for every generated
image when a scorer declares `needs_attention`, else for the first `attention_images` generation images (the
gallery's), never for the rest of a 5,000-image split.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Mapping

import hydra
import torch

from captioner.errors import UserError
from captioner.models.captioner import (
    build_captioner,
    caption_batch,
    caption_batch_with_attention,
    generation_settings,
    load_pretrained_weights,
    resolve_lm,
    resolve_vision,
)
from captioner.training.base import TrainingModule

log = logging.getLogger(__name__)

DEFAULT_SCORERS = {"captions": {"_target_": "captioner.eval.caption_metrics.CaptionScorer"}}
PAIRS, GENERATION = 0, 1  # validation dataloader indices


class CaptionModule(TrainingModule):
    """Caption loss on (image, caption) pairs; validation adds generated captions, scored by `scorers`.

    lm, vision, cross_every, trainable: the captioner (see `build_captioner`); generation: `Captioner.generate`
    settings for validation (and the defaults of captioning later); scorers: {name: {"_target_": callable, ...}},
    each called as scorer(predictions {image_id: caption}, references {image_id: [captions]}) and returning
    (overall {metric: value}, per image {image_id: {metric: value}}); every overall value is logged as val/<metric>.
    A scorer whose class declares `needs_attention = True` is also given attention={image_id: AttentionMaps}, the
    maps of every generated caption. attention_images: otherwise, how many generation images get maps for the
    gallery and wandb table (the loader's first, in whole batches; 0: none).
    """

    def __init__(
        self,
        lm: dict,
        vision: dict,
        cross_every: int = 2,
        trainable: list[str] = ("xattn", "projection"),
        optim: dict | None = None,
        generation: dict | None = None,
        scorers: dict | None = None,
        attention_images: int = 0,
    ):
        super().__init__(optim)
        if attention_images < 0:
            raise UserError(f"model.attention_images must be >= 0, got {attention_images}")
        lm, vision = resolve_lm(lm), resolve_vision(vision)
        self.save_hyperparameters(
            {
                "lm": lm,
                "vision": vision,
                "cross_every": cross_every,
                "trainable": list(trainable),
                "optim": dataclasses.asdict(self.optim_cfg),
                "generation": dict(generation or {}),
                "scorers": dict(DEFAULT_SCORERS if scorers is None else scorers),
                "attention_images": attention_images,
            }
        )
        # known on every rank (each computes its own images' maps), while the scorers are built on rank 0 only
        self._attention_scorers = {
            name for name, spec in self.hparams.scorers.items() if needs_attention(name, spec)
        }
        # Random init here: `load_pretrained()` copies the pretrained weights in, which captioner-train does for a
        # fresh run only (a resumed run restores everything from its checkpoint).
        self.model = build_captioner(lm, vision, cross_every, trainable)
        self._flops_terms = self._count_flops()  # now: a model FSDP has sharded shows only a shard of each
        self._scorers = None  # built on first use, on rank 0 only
        self._generated: list[dict] = []
        self._skipped = 0
        self.val_predictions: list[dict] = []  # [{image_id, path, caption, references, scores}], by image id
        self.val_scores: dict = {}  # overall scores of the last validation, with its step

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def flops_per_batch(self, batch) -> torch.Tensor:
        """Training FLOPs of one micro-batch (ThroughputCallback's MFU), counted for the work that actually runs.

        Per parameter and token (PaLM appendix B's 6N, part by part): 2 for the forward, +2 for the weight
        gradient if it trains, +2 for the input gradient where backward goes on below it (something before it
        trains). With the default freeze policy the LM blocks before the first cross-attention layer count 2,
        the later frozen blocks and the tied output layer 4, cross-attention and projection 6; CLIP counts 2 per
        image token when the batch carries pixels, nothing when it carries cached features. Attention adds
        4·T·C per token and layer forward (4·N·C for cross-attention), ×3 where backward runs through it.
        Padding positions count (the blocks compute them) except in the output layer, which the loss runs on
        targets only; that count stays a tensor on the device, so counting adds no host sync. Biases and norms
        count as matmul parameters, as in 6N (a few % at width 32; 0.1 % at GPT-2 124M + ViT-B/32).
        """
        terms = self._flops_terms
        B, T = batch["input_ids"].shape  # (B, T)
        N = self.model.vision.num_tokens
        flops = B * T * (terms["text"] + terms["text_attn"] * T + terms["cross_attn"] * N)
        flops += B * N * terms["image"]
        if "pixel_values" in batch:
            flops += B * N * (terms["clip"] + terms["clip_attn"] * N)
        return terms["head"] * (batch["labels"] != -100).sum() + flops

    def _count_flops(self) -> dict[str, int]:
        """Per-token FLOPs of each part of `flops_per_batch` (attention terms per token of sequence length),
        read once from the model at construction, where its freeze policy is fixed and no strategy has wrapped
        or sharded it yet."""
        lm, vision = self.model.lm, self.model.vision
        C, D, clip_layers = lm.config.n_embd, vision.hidden_size, vision.clip.config.num_hidden_layers

        def size(params) -> int:
            return sum(p.numel() for p in params)

        def trains(module: torch.nn.Module) -> bool:
            return any(p.requires_grad for p in module.parameters())

        def factor(trained: bool, grad_in: bool) -> int:  # forward, weight gradient, input gradient
            return 2 + 2 * trained + 2 * grad_in

        def passes(f: int) -> int:  # attention has no weights: forward, plus backward (2x) wherever it runs
            return 1 if f == 2 else 3

        clip, proj = vision.clip_parameters(), vision.proj
        clip_trains = any(p.requires_grad for p in clip)
        f = factor(clip_trains, clip_trains)  # a trained CLIP's layers pass gradients down to its patches
        terms = {"clip": f * size(clip), "clip_attn": passes(f) * 4 * clip_layers * D}
        terms["image"] = factor(trains(proj), clip_trains) * size(proj.parameters())
        context_grad = clip_trains or trains(proj)
        grad = trains(lm.transformer.wte)  # wpe trains with it: both belong to the "lm" part
        terms.update(text=0, text_attn=0, cross_attn=0)
        for i, block in enumerate(lm.transformer.h):
            f = factor(trains(block), grad)
            terms["text"] += f * size(block.parameters())
            terms["text_attn"] += passes(f) * 4 * C
            grad = grad or trains(block)
            if str(i) in lm.cross:
                layer = lm.cross[str(i)]
                trained = trains(layer)
                kv = size(layer.c_kv.parameters())  # keys/values run on the image tokens
                q = size(layer.ln_1.parameters()) + size(layer.c_q.parameters())  # below the attention
                rest = size(layer.parameters()) - kv - q  # past the attention: gradient from text or image
                f = factor(trained, trained or grad or context_grad)
                terms["text"] += factor(trained, grad) * q + f * rest
                terms["cross_attn"] += passes(f) * 4 * C
                terms["image"] += factor(trained, context_grad) * kv
                grad = grad or trained or context_grad
        terms["text"] += factor(trains(lm.transformer.ln_f), grad) * size(lm.transformer.ln_f.parameters())
        terms["head"] = factor(trains(lm.lm_head), grad) * lm.lm_head.weight.numel()
        return terms

    def load_pretrained(self) -> None:
        load_pretrained_weights(self.model, self.hparams.lm, self.hparams.vision)

    # --- steps --------------------------------------------------------------------------------------------
    def _loss(self, batch) -> torch.Tensor:
        if batch["labels"].numel() == 0:  # a shape, known on the host: no device sync
            # Every image of this batch was unreadable (any other batch has a label per caption, at least its
            # EOT): a zero loss that still touches every trainable parameter keeps DDP's gradient all-reduce
            # in step across ranks.
            return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
        _, loss = self.model(
            batch["input_ids"],
            labels=batch["labels"],
            pixel_values=batch.get("pixel_values"),
            features=batch.get("features"),
            return_logits=False,
            n_targets=batch.get("n_targets"),
        )
        return loss

    def training_step(self, batch, batch_idx):
        self._count_skipped(batch)
        loss = self._loss(batch)
        self.accumulate_loss(loss, batch["input_ids"].numel())
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx: int = PAIRS):
        if dataloader_idx == GENERATION:
            self._generate(batch)
            return
        self._count_skipped(batch)
        self.log(
            "val/loss",
            self._loss(batch),
            on_epoch=True,
            sync_dist=True,
            prog_bar=True,
            batch_size=len(batch["labels"]),
            add_dataloader_idx=False,
        )

    def _count_skipped(self, batch) -> None:
        if skipped := batch.get("skipped"):
            self._skipped += len(skipped)
            log.warning(
                "skipped unreadable images: %s (%d so far on rank %d)",
                skipped,
                self._skipped,
                self.global_rank,
            )

    # --- generation + scores ------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._generated = []

    def _generate(self, batch) -> None:
        key = "features" if "features" in batch else "pixel_values"
        images, generation = {key: batch[key]}, generation_settings(self.hparams.generation)
        maps = None
        with self.eval_context():  # Lightning's precision, not caption_batch's own autocast
            if self._maps_wanted():
                captions, maps = caption_batch_with_attention(
                    self.model, **images, autocast=False, **generation
                )
            else:
                captions = caption_batch(self.model, **images, autocast=False, **generation)
        for i, caption in enumerate(captions):
            item = {
                "image_id": int(batch["image_ids"][i]),
                "path": batch["paths"][i],
                "caption": caption,
                "references": batch["references"][i],
            }
            if maps is not None:  # numpy float32 grids: small for all_gather_object
                item["attention"] = maps[i]
            self._generated.append(item)

    def _maps_wanted(self) -> bool:
        """Whether this generation batch gets attention maps: every batch when a scorer grades them, else the
        batches holding the loader's first `attention_images` images, which it deals out round-robin over ranks
        (global index = rank + world_size * local index), so each rank maps its first whole batches only."""
        if self._attention_scorers:
            return True
        wanted = self.hparams.attention_images
        return wanted > 0 and self.global_rank + self.trainer.world_size * len(self._generated) < wanted

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        items = self._generated
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, items)
            items = [item for part in gathered for item in part]
        items = sorted(items, key=lambda item: item["image_id"])
        if not items:
            return
        result = None
        if self.trainer.is_global_zero:
            try:
                result = self.score(items)
            except Exception as err:  # re-raised on every rank below, so no rank waits in a collective
                result = err
        result = self.trainer.strategy.broadcast(result, src=0)
        if isinstance(result, Exception):
            raise RuntimeError(f"caption scoring failed on rank 0: {result!r}") from None
        overall, per_image = result
        for name, value in overall.items():
            if value is not None:
                self.log(f"val/{name}", float(value))
        self.val_scores = {"step": self.global_step, **{k: v for k, v in overall.items() if v is not None}}
        self.val_predictions = [{**item, "scores": per_image.get(item["image_id"], {})} for item in items]
        self._log_gates()

    def _log_gates(self) -> None:
        """How far each cross-attention layer lets the image in: tanh of its attention and MLP gates."""
        for layer, cross in self.model.lm.cross.items():
            self.log(f"gates/attn_{layer}", float(cross.attn_gate.detach().tanh()))
            self.log(f"gates/ff_{layer}", float(cross.ff_gate.detach().tanh()))

    def score(self, items: list[dict]) -> tuple[dict, dict[int, dict]]:
        """Every configured scorer on generated items; their overall and per-image scores merged."""
        if self._scorers is None:
            self._scorers = {
                name: hydra.utils.instantiate(spec) for name, spec in self.hparams.scorers.items()
            }
        predictions = {item["image_id"]: item["caption"] for item in items}
        references = {item["image_id"]: item["references"] for item in items}
        maps = {item["image_id"]: item["attention"] for item in items if "attention" in item}
        overall, per_image = {}, {image_id: {} for image_id in predictions}
        for name, scorer in self._scorers.items():
            if name in self._attention_scorers:
                scores, image_scores = scorer(predictions, references, attention=maps)
            else:
                scores, image_scores = scorer(predictions, references)
            overall.update(scores)
            for image_id, values in image_scores.items():
                per_image[image_id].update(values)
        return overall, per_image


def needs_attention(name: str, spec: Mapping) -> bool:
    """Whether scorer `name` reads attention maps: its `_target_` (class or function) declares
    `needs_attention`, looked up without building the scorer (hydra's get_object would log its own error first)."""
    target = spec.get("_target_") if isinstance(spec, Mapping) else None
    if not target:
        raise UserError(f"model.scorers.{name}: needs a _target_ (got {spec!r})")
    module, _, attribute = target.rpartition(".")
    try:
        scorer = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"model.scorers.{name}._target_={target}: {err}") from None
    return bool(getattr(scorer, "needs_attention", False))
