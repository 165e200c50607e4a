"""The shapes world's stand-in for a pretrained CLIP: a tiny `CLIPVisionModel` taught to see the world's objects.

The real recipe starts stage 2 from openai/clip-vit-base-patch32, pretrained on 400M image-text pairs. Offline
there is no such checkpoint, and a ViT trained from scratch through the caption loss alone learns far too
slowly for a CPU demo (measured: object accuracy 0.04 after 400 caption steps; the model learns the colours and
little else). So the demo pretrains its tiny CLIP first, in seconds, with a direct objective: the model's 3x3
patch grid is the world's 3x3 grid, and each patch token names its cell's object (colour, shape, size, or
empty) through linear heads that are thrown away afterwards. The result is written with `save_pretrained`, so
stage 2 loads it exactly as it loads the hub CLIP (`model.vision.clip=<dir>`) and keeps it frozen.

    out_dir/config.json, model.safetensors   the CLIP vision tower (transformers format)
    out_dir/shapes_clip.json                 how it was trained and its val accuracy

Written atomically (a temporary directory renamed into place); a finished out_dir is never retrained.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner.data.coco_format import load_captions
from captioner.errors import UserError
from captioner.io import make_shareable, save_json
from captioner.models.vision import ClipPreprocess, token_parameters
from captioner.optim import warmup_cosine
from captioner.shapes.world import COLORS, GRID, SHAPES, SIZES, Scene, load_scenes

log = logging.getLogger(__name__)

# A CLIPVisionConfig whose patches are the world's grid cells: 48 px images (the 64 px renders resized), 16 px
# patches -> 3x3 patch tokens + CLS.
DEFAULT_CLIP_CONFIG = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=48,
    patch_size=16,
)
ATTRIBUTES = (("color", COLORS), ("shape", SHAPES), ("size", SIZES))  # each gets one class more: "empty"
REPORT = "shapes_clip.json"


def cell_labels(scene: Scene) -> torch.Tensor:
    """(GRID*GRID, 3) int64: per cell in reading order, the index of its object's colour, shape and size, or
    len(values) for an empty cell."""
    labels = torch.tensor([[len(values) for _, values in ATTRIBUTES]] * (GRID * GRID))  # (9, 3)
    for obj in scene.objects:
        labels[obj.row * GRID + obj.col] = torch.tensor(
            [values.index(getattr(obj, name)) for name, values in ATTRIBUTES]
        )
    return labels


def load_split(images_root: str | Path, split: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A shapes images split as (pixels (N, 3, S, S) CLIP-preprocessed, labels (N, GRID*GRID, 3)).
    Unreadable images are skipped and counted in the log."""
    root = Path(images_root)
    index = load_captions(root, split, prepare_hint="captioner-prepare shapes")
    scenes = load_scenes(root / "annotations" / f"scenes_{split}.json")
    preprocess = ClipPreprocess(image_size)
    pixels, labels, skipped = [], [], []
    for i, image_id in enumerate(index.image_ids):
        if image_id not in scenes:
            raise UserError(f"{root}/annotations/scenes_{split}.json has no scene for image {image_id}")
        image = preprocess(index.image_path(i))  # (3, S, S), or None when unreadable
        if image is None:
            skipped.append(index.file_names[i])
            continue
        pixels.append(image)
        labels.append(cell_labels(scenes[image_id]))
    if skipped:
        log.warning("%s: skipped %d unreadable images: %s", split, len(skipped), ", ".join(skipped[:10]))
    if not pixels:
        raise UserError(f"{root}: no readable images in split {split!r}")
    return torch.stack(pixels), torch.stack(labels)


class CellHeads(nn.Module):
    """Linear heads on the patch tokens: per cell, logits for each attribute (+ "empty")."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden_size, len(values) + 1) for _, values in ATTRIBUTES)

    def forward(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """patches (B, GRID*GRID, D) → one (B, GRID*GRID, classes) tensor per attribute."""
        return [head(patches) for head in self.heads]


def _patches(clip, pixels: torch.Tensor) -> torch.Tensor:
    return clip(pixel_values=pixels).last_hidden_state[:, 1:]  # (B, GRID*GRID, D): CLS dropped


@torch.no_grad()
def cell_accuracy(clip, heads: CellHeads, pixels, labels, batch_size: int = 256) -> dict[str, float]:
    """{"cell": fraction of cells with every attribute right, "scene": fraction of images with every cell right}."""
    was_training = clip.training
    clip.eval()
    right = []
    for i in range(0, len(pixels), batch_size):
        logits = heads(_patches(clip, pixels[i : i + batch_size]))
        pred = torch.stack([x.argmax(-1) for x in logits], dim=-1)  # (B, 9, 3)
        right.append((pred == labels[i : i + batch_size]).all(-1))  # (B, 9)
    clip.train(was_training)
    right = torch.cat(right)
    return {"cell": right.float().mean().item(), "scene": right.all(-1).float().mean().item()}


def train_shapes_clip(
    images_root: str | Path,
    out_dir: str | Path,
    *,
    clip_config: dict | None = None,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 1e-3,
    warmup_steps: int = 50,
    seed: int = 0,
) -> dict:
    """Train the stand-in CLIP on images_root's train split, score it on val, save it to out_dir. Returns the
    report (also out_dir/shapes_clip.json). An out_dir that already holds a report is returned as is."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    out_dir = Path(out_dir)
    if (out_dir / REPORT).exists():
        log.info("%s already holds a trained stand-in CLIP; skipping", out_dir)
        return json.loads((out_dir / REPORT).read_text())
    if steps < 1:
        raise UserError(f"steps must be >= 1, got {steps}")
    if out_dir.exists():
        raise UserError(f"{out_dir} exists but holds no {REPORT}: not a stand-in CLIP; move it away")
    config = CLIPVisionConfig(**{**DEFAULT_CLIP_CONFIG, **(clip_config or {})})
    if config.image_size != GRID * config.patch_size:
        raise UserError(
            f"clip_config: image_size ({config.image_size}) must be {GRID} x patch_size ({config.patch_size}), "
            f"so that each patch is one cell of the world's {GRID}x{GRID} grid"
        )
    train_x, train_y = load_split(images_root, "train", config.image_size)
    val_x, val_y = load_split(images_root, "val", config.image_size)

    torch.manual_seed(seed)
    clip = CLIPVisionModel(config)
    heads = CellHeads(config.hidden_size)
    params = token_parameters(clip) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    clip.train()
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step, warmup_steps=warmup_steps, max_steps=steps)
        idx = torch.randint(0, len(train_x), (batch_size,), generator=order)
        logits = heads(_patches(clip, train_x[idx]))
        loss = sum(
            F.cross_entropy(x.flatten(0, 1), train_y[idx][..., a].flatten()) for a, x in enumerate(logits)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == steps - 1:
            log.info("stand-in CLIP step %d/%d loss %.4f", step + 1, steps, losses[-1])

    report = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_images": len(train_x),
        "val_images": len(val_x),
        "val_accuracy": cell_accuracy(clip, heads, val_x, val_y),
        "first_loss": losses[0],
        "final_loss": losses[-1],
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        clip.save_pretrained(tmp)
        save_json(tmp / REPORT, report, indent=2)
        make_shareable(tmp)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
