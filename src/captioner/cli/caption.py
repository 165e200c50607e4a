"""`captioner-caption --ckpt CKPT_OR_DIR IMAGE_OR_DIR… [--beams N] [--max-new-tokens N] [--json]`: one line
per image, `<path>\\t<caption>`, or with --json `{"path": …, "caption": …}` (plus `"image_id"` for COCO file
names, so the lines make a COCO results file). Unreadable images are skipped with a message on stderr."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from captioner.api import load
from captioner.cli.boundary import error_boundary
from captioner.errors import UserError
from captioner.models.vision import UnreadableImage

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# 000000000139.jpg (COCO 2017) and COCO_val2014_000000000139.jpg (COCO 2014) are both image 139
COCO_NAME = re.compile(r"(?:COCO_[a-z]+\d{4}_)?(\d+)")


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as named, folders expanded to their images (sorted, not recursive); a missing path raises."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise UserError(f"no such image or folder: {item}")
    return paths


def coco_image_id(path: Path) -> int | None:
    match = COCO_NAME.fullmatch(path.stem)
    return int(match.group(1)) if match else None


def output_line(path: Path, caption: str, as_json: bool) -> str:
    if as_json:
        record = {"path": str(path), "caption": caption}
        if (image_id := coco_image_id(path)) is not None:
            record["image_id"] = image_id
        return json.dumps(record)
    return f"{path}\t{' '.join(caption.split())}"  # a newline or tab in a caption would break the format


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captioner-caption", description=__doc__)
    parser.add_argument(
        "--ckpt", required=True, help="a caption run's checkpoint (.ckpt) or exported directory"
    )
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--beams", type=int, default=None, help="beam size, 1 = greedy (default: as trained)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: as trained")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument(
        "--json", action="store_true", help="JSON lines {path, caption[, image_id]} instead of TSV"
    )
    args = parser.parse_args(argv)
    if (args.beams is not None and args.beams < 1) or args.batch_size < 1:
        parser.error("--beams and --batch-size must be ≥ 1")
    generation = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}

    def skip(err: UnreadableImage) -> None:
        print(f"captioner-caption: skipping {err}", file=sys.stderr)

    with error_boundary("captioner-caption"):  # a bad saved decoding setting shows while captioning, too
        paths = collect_images(args.images)
        pipeline = load(args.ckpt, device=args.device)
        captions = pipeline.iter_captions(
            paths, args.beams, args.batch_size, on_unreadable=skip, **generation
        )
        for position, caption in captions:
            print(output_line(paths[position], caption, args.json), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
