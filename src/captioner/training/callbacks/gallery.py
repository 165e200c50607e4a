"""A self-contained HTML gallery of validation captions: image, generated caption, references, per-image scores.

Images are embedded as base64 data URIs (resized to at most 224 px), so the file can be mailed or opened anywhere.
The caption LightningModule keeps `val_predictions` (and `val_scores`) from its last validation;
`CaptionGalleryCallback` writes them to <run_dir>/gallery.html, and to a wandb table, after every validation.

An item with attention maps (its "attention": `AttentionMaps`) shows its caption as words: hovering one draws that
word's map (the map of its first token, as pointing accuracy reads it) over the image's centre square, the part
CLIP sees, in jet colours, by a few lines of inline script from the small JSON grids in the page. In the wandb
table such a row gets an "attention" image, `attention_strip`'s. Items without maps render as before.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from PIL import Image

from captioner.errors import UserError
from captioner.io import save_text
from captioner.models.attention_maps import AttentionMaps, attention_strip

log = logging.getLogger(__name__)

MAX_SIDE = 224
REQUIRED_KEYS = ("image_id", "path", "caption")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ddd; padding: 6px 10px; vertical-align: top; text-align: left; }
th { background: #f4f4f4; }
td.img { width: 230px; text-align: center; }
.placeholder { width: 224px; height: 160px; display: flex; align-items: center; justify-content: center;
               background: #eee; color: #888; font-size: 0.85em; word-break: break-all; }
.caption { font-weight: 600; }
.id { color: #888; font-size: 0.8em; }
ul { margin: 0; padding-left: 1.2em; }
.frame { position: relative; display: inline-block; }
.frame img { min-width: 192px; }  /* a small image (the shapes world's 64 px) is scaled up for its map */
.frame canvas { position: absolute; pointer-events: none; display: none; }
.word { cursor: crosshair; border-bottom: 1px dotted #999; }
.word:hover { background: #ffe9a8; }
.hint { color: #666; }
"""

# Hovering a word draws its grid, min-max scaled through a jet colormap at half opacity (as `overlay` does), on a
# canvas over the image's centre square; the browser's smoothing upsamples the few cells bilinearly.
SCRIPT = """
function jet(x) {
  const c = (v) => Math.round(255 * Math.max(0, Math.min(1, v)));
  return [c(1.5 - Math.abs(4 * x - 3)), c(1.5 - Math.abs(4 * x - 2)), c(1.5 - Math.abs(4 * x - 1))];
}
function showMap(word) {
  const row = word.closest("tr"), img = row.querySelector(".frame img"), canvas = row.querySelector(".frame canvas");
  if (!img || !canvas) return;
  const grid = JSON.parse(word.dataset.grid), cells = grid.flat();
  const lo = Math.min(...cells), span = Math.max(Math.max(...cells) - lo, 1e-12);
  const small = document.createElement("canvas");
  small.width = grid[0].length; small.height = grid.length;
  const ctx = small.getContext("2d"), pixels = ctx.createImageData(small.width, small.height);
  cells.forEach((v, i) => pixels.data.set([...jet((v - lo) / span), 128], 4 * i));
  ctx.putImageData(pixels, 0, 0);
  const side = Math.min(img.width, img.height);
  canvas.width = canvas.height = side;
  canvas.style.left = (img.offsetLeft + (img.width - side) / 2) + "px";
  canvas.style.top = (img.offsetTop + (img.height - side) / 2) + "px";
  const out = canvas.getContext("2d");
  out.imageSmoothingEnabled = true;
  out.drawImage(small, 0, 0, side, side);
  canvas.style.display = "block";
}
function hideMap(word) {
  const canvas = word.closest("tr").querySelector(".frame canvas");
  if (canvas) canvas.style.display = "none";
}
document.querySelectorAll(".word").forEach((word) => {
  word.addEventListener("mouseenter", () => showMap(word));
  word.addEventListener("mouseleave", () => hideMap(word));
});
"""


def image_data_uri(path: str | os.PathLike, max_side: int = MAX_SIDE) -> str:
    """Read an image, shrink it to fit `max_side`, and return it as a data URI (PNG for PNG sources, else JPEG)."""
    with Image.open(path) as img:
        lossless = img.format == "PNG"
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if lossless:  # small synthetic images (shapes world) would smear under JPEG
        img.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        img.save(buf, format="JPEG", quality=88)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _fmt(value) -> str:
    if value is None:
        return "–"  # e.g. METEOR where Java is missing
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _scores_table(scores: Mapping) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in scores.items())
    return f"<table>{rows}</table>"


def _image_cell(path, with_canvas: bool = False) -> str:
    try:
        uri = image_data_uri(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("gallery: cannot read image %s (%s); using a placeholder", path, e)
        return f'<div class="placeholder">image unavailable:<br>{html.escape(str(path))}</div>'
    img = f'<img src="{uri}" alt="{html.escape(str(path))}">'
    return f'<div class="frame">{img}<canvas></canvas></div>' if with_canvas else img


def caption_words(maps: AttentionMaps) -> list[tuple[str, int]]:
    """(word, index of its first token) for the caption `maps.tokens` spell: a token opening with a space starts
    a word, any other (a word piece, punctuation) continues the word before it."""
    words: list[tuple[str, int]] = []
    for t, token in enumerate(maps.tokens):
        if not words or token[:1].isspace():
            words.append((token.strip(), t))
        else:
            words[-1] = (words[-1][0] + token, words[-1][1])
    return [(word, t) for word, t in words if word]


def _word_span(word: str, grid: np.ndarray, cls: float) -> str:
    cells = json.dumps(np.round(grid.astype(np.float64), 4).tolist(), separators=(",", ":"))  # (H, W)
    return (
        f'<span class="word" data-grid="{html.escape(cells)}" title="attention on CLS: {cls:.0%}">'
        f"{html.escape(word)}</span>"
    )


def _caption_cell(item: Mapping) -> str:
    maps = item.get("attention")
    if maps is None:
        return html.escape(str(item["caption"]))
    return " ".join(_word_span(word, maps.patches[t], float(maps.cls[t])) for word, t in caption_words(maps))


def _item_row(index: int, item: Mapping) -> str:
    missing = [k for k in REQUIRED_KEYS if k not in item]
    if missing:
        raise KeyError(f"gallery item {index} lacks {missing} (has {sorted(item)})")
    refs = "".join(f"<li>{html.escape(str(r))}</li>" for r in item.get("references", []))
    image = _image_cell(item["path"], with_canvas="attention" in item)
    return (
        "<tr>"
        f'<td class="img">{image}<div class="id">{html.escape(str(item["image_id"]))}</div></td>'
        f'<td class="caption">{_caption_cell(item)}</td>'
        f"<td><ul>{refs}</ul></td>"
        f"<td>{_scores_table(item.get('scores', {}))}</td>"
        "</tr>"
    )


def render_gallery(
    items: Sequence[Mapping], summary: Mapping | None = None, title: str = "Caption gallery"
) -> str:
    """The gallery as one HTML string; every text field is escaped.

    Each item: {"image_id", "path", "caption", "references": [str], "scores": {name: float | None}}, and
    optionally "attention": the caption's `AttentionMaps` (its words then show their maps on hover).
    """
    rows = "\n".join(_item_row(i, item) for i, item in enumerate(items))
    header = f"<h2>Overall scores</h2>\n{_scores_table(summary)}\n" if summary else ""
    mapped = any("attention" in item for item in items)
    hint = (
        '<p class="hint">Hover a word of a caption: its cross-attention map over the image (red: most attention; '
        "the tooltip gives the share that went to CLIP's CLS token instead).</p>\n"
    )
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{header}"
        f"<h2>{len(items)} validation images</h2>\n{hint if mapped else ''}"
        "<table>\n<tr><th>image</th><th>generated caption</th><th>references</th><th>scores</th></tr>\n"
        f"{rows}\n</table>\n{f'<script>{SCRIPT}</script>' if mapped else ''}</body></html>\n"
    )


def write_gallery(
    items: Sequence[Mapping], out_path: str | os.PathLike, summary: Mapping | None = None
) -> Path:
    """Render `items` (see `render_gallery`) to `out_path` atomically; an unreadable image gets a placeholder."""
    out_path = Path(out_path)
    save_text(out_path, render_gallery(items, summary))
    return out_path


def wandb_table(items: Sequence[Mapping]) -> tuple[list[str], list[list]]:
    """(columns, rows) of the `val/samples` table: image, caption, references, each per-image score, and when any
    item has attention maps an "attention" column (`attention_strip` of its maps; None in rows without)."""
    import wandb

    metrics = sorted({name for item in items for name in item.get("scores", {})})
    mapped = any("attention" in item for item in items)
    columns = ["image", "caption", "references", *metrics, *(["attention"] if mapped else [])]
    rows = []
    for item in items:
        row = [
            wandb.Image(str(item["path"])),
            item["caption"],
            " | ".join(item.get("references", [])[:5]),
            *[item.get("scores", {}).get(name) for name in metrics],
        ]
        if mapped:
            row.append(_strip_image(item) if "attention" in item else None)
        rows.append(row)
    return columns, rows


def _strip_image(item: Mapping):
    import wandb

    with Image.open(item["path"]) as image:
        return wandb.Image(attention_strip(image, item["attention"]), caption=item["caption"])


class CaptionGalleryCallback(pl.Callback):
    """Show the captions of each validation: <default_root_dir>/`filename` (self-contained HTML) and, where a wandb
    logger runs, a `val/samples` table, both from the same first `max_items` of `pl_module.val_predictions`, those
    with attention maps first (the module maps only its first generation images unless a scorer needs them all),
    with `pl_module.val_scores` as the summary. Rank zero only.

    A failure is logged as a warning rather than raised: the checkpoints and metrics of the run matter more.
    """

    def __init__(self, filename: str = "gallery.html", max_items: int = 24):
        super().__init__()
        if max_items < 1:
            raise UserError(f"max_items must be >= 1, got {max_items}")
        self.filename = filename
        self.max_items = max_items

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        predictions = list(getattr(pl_module, "val_predictions", None) or [])
        items = sorted(predictions, key=lambda item: "attention" not in item)[: self.max_items]  # stable
        if not items:
            log.warning("CaptionGalleryCallback: the module has no val_predictions; no gallery")
            return
        summary = getattr(pl_module, "val_scores", None)
        try:
            out = write_gallery(items, Path(trainer.default_root_dir) / self.filename, summary=summary)
            log.info("gallery written: %s", out)
            self._log_wandb_table(trainer, items)
        except Exception:
            log.warning("CaptionGalleryCallback: writing the gallery failed", exc_info=True)

    @staticmethod
    def _log_wandb_table(trainer: pl.Trainer, items: list[Mapping]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        columns, rows = wandb_table(items)
        for logger in loggers:
            logger.log_table("val/samples", columns=columns, data=rows, step=trainer.global_step)
