"""A self-contained HTML gallery of validation captions: image, generated caption, references, per-image scores.

Images are embedded as base64 data URIs (resized to at most 224 px), so the file can be mailed or opened anywhere.
The caption LightningModule keeps `val_predictions` (and `val_scores`) from its last validation;
`CaptionGalleryCallback` writes them to <run_dir>/gallery.html, and to a wandb table, after every validation.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning.pytorch as pl
from PIL import Image

from captioner.errors import UserError
from captioner.io import save_text

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


def _image_cell(path) -> str:
    try:
        uri = image_data_uri(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        log.warning("gallery: cannot read image %s (%s); using a placeholder", path, e)
        return f'<div class="placeholder">image unavailable:<br>{html.escape(str(path))}</div>'
    return f'<img src="{uri}" alt="{html.escape(str(path))}">'


def _item_row(index: int, item: Mapping) -> str:
    missing = [k for k in REQUIRED_KEYS if k not in item]
    if missing:
        raise KeyError(f"gallery item {index} lacks {missing} (has {sorted(item)})")
    refs = "".join(f"<li>{html.escape(str(r))}</li>" for r in item.get("references", []))
    return (
        "<tr>"
        f'<td class="img">{_image_cell(item["path"])}<div class="id">{html.escape(str(item["image_id"]))}</div></td>'
        f'<td class="caption">{html.escape(str(item["caption"]))}</td>'
        f"<td><ul>{refs}</ul></td>"
        f"<td>{_scores_table(item.get('scores', {}))}</td>"
        "</tr>"
    )


def render_gallery(
    items: Sequence[Mapping], summary: Mapping | None = None, title: str = "Caption gallery"
) -> str:
    """The gallery as one HTML string; every text field is escaped.

    Each item: {"image_id", "path", "caption", "references": [str], "scores": {name: float | None}}.
    """
    rows = "\n".join(_item_row(i, item) for i, item in enumerate(items))
    header = f"<h2>Overall scores</h2>\n{_scores_table(summary)}\n" if summary else ""
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{header}"
        f"<h2>{len(items)} validation images</h2>\n"
        "<table>\n<tr><th>image</th><th>generated caption</th><th>references</th><th>scores</th></tr>\n"
        f"{rows}\n</table>\n</body></html>\n"
    )


def write_gallery(
    items: Sequence[Mapping], out_path: str | os.PathLike, summary: Mapping | None = None
) -> Path:
    """Render `items` (see `render_gallery`) to `out_path` atomically; an unreadable image gets a placeholder."""
    out_path = Path(out_path)
    save_text(out_path, render_gallery(items, summary))
    return out_path


class CaptionGalleryCallback(pl.Callback):
    """Show the captions of each validation: <default_root_dir>/`filename` (self-contained HTML) and, where a wandb
    logger runs, a `val/samples` table, both from the same first `max_items` of `pl_module.val_predictions`
    (with `pl_module.val_scores` as the summary). Rank zero only.

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
        items = list(getattr(pl_module, "val_predictions", None) or [])[: self.max_items]
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
        import wandb

        metrics = sorted({name for item in items for name in item.get("scores", {})})
        rows = [
            [
                wandb.Image(str(item["path"])),
                item["caption"],
                " | ".join(item.get("references", [])[:5]),
                *[item.get("scores", {}).get(name) for name in metrics],
            ]
            for item in items
        ]
        for logger in loggers:
            logger.log_table(
                "val/samples",
                columns=["image", "caption", "references", *metrics],
                data=rows,
                step=trainer.global_step,
            )
