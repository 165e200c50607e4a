"""Stage 2: a pretrained GPT-2 reads a frozen CLIP's image tokens through gated cross-attention."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from captioner.models.captioner import Captioner
from captioner.models.gpt import GPT, GPTConfig
from captioner.models.vision import VisionEncoder
from captioner.modules.common import TrainingModule
from captioner.modules.pretrain import resolve_gpt_config

log = logging.getLogger(__name__)

METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def resolve_lm(lm: dict) -> dict:
    """Fill `lm.config` (the architecture) from wherever the weights come from, without loading weights twice
    later: a stage-1 checkpoint (`ckpt`), an HF GPT-2 (`hf`), or a named/explicit config (random init)."""
    lm = dict(lm)
    if lm.get("ckpt") and lm.get("hf"):
        raise ValueError(f"model.lm: give either ckpt ({lm['ckpt']}) or hf ({lm['hf']}), not both")
    if lm.get("config") is None or isinstance(lm["config"], str) or "name" in lm["config"]:
        if lm.get("ckpt"):
            path = Path(lm["ckpt"])
            if not path.exists():
                raise FileNotFoundError(f"model.lm.ckpt: {path} does not exist (train stage 1 first)")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            lm["config"] = dict(ckpt["hyper_parameters"]["model"])
        elif lm.get("hf"):
            from transformers import GPT2Config

            hf = GPT2Config.from_pretrained(lm["hf"])
            lm["config"] = dataclasses.asdict(
                GPTConfig(
                    block_size=hf.n_positions,
                    vocab_size=hf.vocab_size,
                    n_layer=hf.n_layer,
                    n_head=hf.n_head,
                    n_embd=hf.n_embd,
                )
            )
        elif lm.get("config"):
            lm["config"] = dataclasses.asdict(resolve_gpt_config(lm["config"]))
        else:
            raise ValueError(
                "model.lm: no language model given: set model.lm.ckpt=<stage-1 last.ckpt>, model.lm.hf=gpt2 "
                "(or a local HF dir), or model.lm.config=<GPTConfig name> for a randomly initialised LM"
            )
    return lm


def resolve_vision(vision: dict) -> dict:
    """Record CLIP's full architecture in the hyper-parameters so a checkpoint rebuilds it offline."""
    vision = dict(vision)
    if vision.get("clip_config") is None:
        if not vision.get("clip"):
            raise ValueError("model.vision: set clip (hub name or local dir) or clip_config (random CLIP)")
        from transformers import CLIPVisionConfig

        try:
            vision["clip_config"] = CLIPVisionConfig.from_pretrained(vision["clip"]).to_dict()
        except OSError as err:
            raise OSError(
                f"model.vision.clip={vision['clip']!r}: CLIP config not found locally or on the hub ({err}); "
                "point it at a local save_pretrained directory, or set model.vision.clip_config for a random CLIP"
            ) from err
    return vision


class CaptionModule(TrainingModule):
    """Caption loss on (image, caption) pairs; validation adds generated captions scored with BLEU/METEOR/
    ROUGE-L/CIDEr-D (and object accuracy on the shapes world), kept for the gallery."""

    def __init__(
        self,
        lm: dict,
        vision: dict,
        cross_every: int = 2,
        trainable: list[str] = ("xattn", "projection"),
        optim: dict | None = None,
        generation: dict | None = None,
        metrics_backend: str = "auto",
        gallery_size: int = 24,
    ):
        super().__init__(optim)
        lm, vision = resolve_lm(lm), resolve_vision(vision)
        self.save_hyperparameters(
            {
                "lm": lm,
                "vision": vision,
                "cross_every": cross_every,
                "trainable": list(trainable),
                "optim": dataclasses.asdict(self.optim_cfg),
                "generation": dict(generation or {}),
                "metrics_backend": metrics_backend,
                "gallery_size": gallery_size,
            }
        )
        config = GPTConfig(**lm["config"])
        # Random init here: `load_pretrained()` copies the pretrained weights in, which captioner-train does for a
        # fresh run only (a resumed run restores everything from its checkpoint; captioning loads the checkpoint).
        encoder = VisionEncoder(config.n_embd, clip=None, clip_config=vision["clip_config"])
        self.model = Captioner(GPT(config), encoder, cross_every=cross_every)
        self.model.set_trainable(trainable)
        self.gallery_items: list[dict] = []
        self.gallery_summary: dict = {}

    def trainable_module(self) -> torch.nn.Module:
        return self.model

    def flops_per_token(self) -> float:
        return self.model.lm.flops_per_token()

    # --- pretrained weights -------------------------------------------------------------------------------
    def load_pretrained(self) -> None:
        lm_cfg, vision_cfg = self.hparams.lm, self.hparams.vision
        if lm_cfg.get("ckpt"):
            source = GPT.from_lightning_checkpoint(lm_cfg["ckpt"])
        elif lm_cfg.get("hf"):
            source = GPT.from_pretrained(lm_cfg["hf"])
        else:
            source = None
        if source is not None:
            missing, unexpected = self.model.lm.load_state_dict(source.state_dict(), strict=False)
            if unexpected or any(not k.startswith("cross.") for k in missing):
                raise RuntimeError(f"LM weights do not fit: missing {missing}, unexpected {unexpected}")
            log.info("language model loaded from %s", lm_cfg.get("ckpt") or lm_cfg.get("hf"))
        if vision_cfg.get("clip"):
            from transformers import CLIPVisionModel

            clip = CLIPVisionModel.from_pretrained(vision_cfg["clip"])
            self.model.vision.clip.load_state_dict(clip.state_dict())
            log.info("CLIP loaded from %s", vision_cfg["clip"])

    def on_fit_start(self) -> None:
        super().on_fit_start()
        features_dir = getattr(self.trainer.datamodule, "hparams", {}).get("features_dir")
        if features_dir:
            self._check_feature_cache(features_dir)

    def _check_feature_cache(self, features_dir: str) -> None:
        """Cached CLIP outputs stand in for a frozen CLIP only: refuse a cache that cannot match the model."""
        if "vision" in self.hparams.trainable:
            raise ValueError(
                f"data.features_dir={features_dir} serves precomputed CLIP outputs, but model.trainable includes "
                "'vision': a trained CLIP needs pixels (set data.features_dir=null or drop 'vision')"
            )
        import json

        split = self.trainer.datamodule.hparams.train_split
        meta_file = Path(features_dir) / f"{split}.json"
        if meta_file.exists():
            cached = json.loads(meta_file.read_text()).get("encoder", {}).get("clip")
            wanted = self.hparams.vision.get("clip")
            if cached and wanted and cached != wanted:
                raise ValueError(
                    f"{meta_file}: features were computed with CLIP {cached!r}, model uses {wanted!r}"
                )

    # --- steps --------------------------------------------------------------------------------------------
    def _forward(self, batch):
        if batch["labels"].numel() == 0 or bool((batch["labels"] == -100).all()):
            # Every image of this batch was unreadable: a zero loss that still touches every trainable
            # parameter keeps DDP's gradient all-reduce in step across ranks.
            return sum(p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad)
        _, loss = self.model(
            batch["input_ids"],
            labels=batch["labels"],
            pixel_values=batch.get("pixel_values"),
            features=batch.get("features"),
            return_logits=False,
        )
        return loss

    def training_step(self, batch, batch_idx):
        self._count_skipped(batch)
        loss = self._forward(batch)
        self.accumulate_loss(loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self._count_skipped(batch)
        loss = self._forward(batch)
        self.log(
            "val/loss", loss, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=len(batch["labels"])
        )

    def _count_skipped(self, batch) -> None:
        skipped = batch.get("skipped") or []
        if skipped:
            self._skipped = getattr(self, "_skipped", 0) + len(skipped)
            log.warning(
                "skipped unreadable images: %s (%d so far on rank %d)",
                skipped,
                self._skipped,
                self.global_rank,
            )

    # --- generation + metrics -----------------------------------------------------------------------------
    def caption_items(self, items: list[dict], batch_size: int = 32) -> list[str]:
        """Generate captions for data-module items (each with pixel_values or features)."""
        from captioner.tokenizer import EOT, gpt2_encoding

        enc = gpt2_encoding()
        gen = dict(self.hparams.generation)
        gen.setdefault("method", "beam")
        captions = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            key = "features" if "features" in chunk[0] else "pixel_values"
            images = torch.stack([torch.as_tensor(it[key]) for it in chunk]).to(self.device)
            ids = self.model.generate(**{key: images}, **gen)
            captions += [enc.decode([t for t in seq if t != EOT]).strip() for seq in ids]
        return captions

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        dm = self.trainer.datamodule
        items = dm.val_generation_items()
        mine = items[self.global_rank :: self.trainer.world_size]
        was_training = self.model.training
        self.model.eval()
        with self.eval_context():
            preds = dict(zip([it["image_id"] for it in mine], self.caption_items(mine), strict=True))
        self.model.train(was_training)
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, preds)
            preds = {k: v for part in gathered for k, v in part.items()}
        refs = dm.val_references()
        result = None
        if self.trainer.is_global_zero:
            try:
                result = self._score(preds, refs, dm)
            except Exception as err:  # re-raised on every rank below, so no rank waits in a collective
                result = err
        result = self.trainer.strategy.broadcast(result, src=0)
        if isinstance(result, Exception):
            raise RuntimeError(f"caption scoring failed on rank 0: {result!r}") from None
        overall, per_image = result
        for key in METRIC_KEYS:
            if overall.get(key) is not None and key in ("bleu4", "meteor", "rouge_l", "cider"):
                self.log(f"val/{key}", float(overall[key]))
        if overall.get("object_acc") is not None:
            self.log("val/object_acc", float(overall["object_acc"]))
        self._keep_gallery(preds, per_image, overall, refs, dm)

    def _score(self, preds: dict[int, str], refs: dict[int, list[str]], dm) -> tuple[dict, dict]:
        from captioner.eval.caption_metrics import score_captions

        overall, per_image = score_captions(
            preds, {i: refs[i] for i in preds}, backend=self.hparams.metrics_backend
        )
        # The shapes world ships scene metadata beside its captions: score whether captions name the right objects.
        scenes_file = Path(dm.hparams.root) / "annotations" / f"scenes_{dm.hparams.val_split}.json"
        if scenes_file.exists():
            from captioner.data.shapes import load_scenes, object_accuracy

            overall["object_acc"] = object_accuracy(preds, load_scenes(scenes_file))
        return overall, per_image

    def _keep_gallery(self, preds, per_image, overall, refs, dm) -> None:
        self.gallery_summary = {
            "step": self.global_step,
            **{k: v for k, v in overall.items() if v is not None},
        }
        self.gallery_items = [
            {
                "image_id": image_id,
                "path": str(dm.image_path(image_id)),
                "caption": caption,
                "references": refs.get(image_id, []),
                "scores": per_image.get(image_id, {}),
            }
            for image_id, caption in list(sorted(preds.items()))[: self.hparams.gallery_size]
        ]
        self._log_wandb_samples()

    def _log_wandb_samples(self) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.loggers:
            if isinstance(logger, WandbLogger) and self.gallery_items:
                import wandb

                rows = [
                    [wandb.Image(it["path"]), it["caption"], " | ".join(it["references"][:3])]
                    for it in self.gallery_items[:8]
                ]
                logger.log_table(
                    "val/samples",
                    columns=["image", "caption", "references"],
                    data=rows,
                    step=self.global_step,
                )
