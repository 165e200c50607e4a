"""`captioner-caption --ckpt CKPT_OR_DIR IMAGE_OR_DIR… [--beams N] [--max-new-tokens N] [--json]
[--attention DIR] [--maps]`: one line per image, `<path>\\t<caption>`, or with --json `{"path": …, "caption": …}`
(plus `"image_id"` for COCO file names, so the lines make a COCO results file). Unreadable images are skipped
with a message on stderr.

Where the captioner looked: --attention DIR writes DIR/<image stem>.png per image (the image, then each caption
token's cross-attention map over CLIP's centre square, jet colours, the token as its title; a stem met again
gets -2, -3, …). With --json, a line carries the maps whenever they are computed, with --attention DIR or with
--maps (maps in the JSON, no PNGs): "tokens" [T], "attention" [T][H][W] (H = W = 7 for ViT-B/32), "cls" [T]
(each token's share on CLIP's CLS token), and with --attention DIR "attention_png" (the PNG's path)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from captioner.api import load
from captioner.cli.boundary import error_boundary
from captioner.errors import UserError
from captioner.io import atomic_path
from captioner.models.attention_maps import AttentionMaps, attention_strip
from captioner.models.vision import UnreadableImage, open_image

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


def output_line(path: Path, result: str | dict, as_json: bool) -> str:
    """The TSV or JSON line of one image; `result`: its caption, or a dict of the caption and the keys a JSON
    line adds (tokens, attention, cls, …)."""
    fields = result if isinstance(result, dict) else {"caption": result}
    if as_json:
        record = {"path": str(path), "caption": fields["caption"]}
        if (image_id := coco_image_id(path)) is not None:
            record["image_id"] = image_id
        return json.dumps({**record, **fields})
    return f"{path}\t{' '.join(fields['caption'].split())}"  # a newline or tab in a caption would break the format


def attention_folder(value: str) -> Path:
    """--attention's folder, created now: a bad one fails before the model loads."""
    folder = Path(value)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--attention {value}: cannot make the folder: {err.strerror}") from None
    return folder


def png_paths(paths: list[Path], folder: Path) -> list[Path]:
    """folder/<stem>.png per image, numbered (-2, -3, …) where a stem comes again: a/cat.jpg and b/cat.png must
    not overwrite each other. From the whole list, so a name never depends on which images were readable."""
    taken, names = set(), []
    for path in paths:
        name, k = path.stem, 1
        while name in taken:
            k += 1
            name = f"{path.stem}-{k}"
        taken.add(name)
        names.append(folder / f"{name}.png")
    return names


def write_strip(image_path: Path, record: dict, dest: Path) -> None:
    """`attention_strip` of one captioned image (a `caption(attention=True)` record), written atomically."""
    with atomic_path(dest) as tmp:
        attention_strip(open_image(image_path), AttentionMaps.from_dict(record)).save(tmp, format="PNG")


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
        "--json",
        action="store_true",
        help="JSON lines {path, caption[, image_id]} instead of TSV; with maps computed (--attention DIR or "
        "--maps) they add tokens, attention [T][H][W] and cls (and attention_png with --attention DIR)",
    )
    parser.add_argument(
        "--attention",
        metavar="DIR",
        default=None,
        help="write DIR/<image stem>.png per image: the image and each token's attention map, titled",
    )
    parser.add_argument(
        "--maps", action="store_true", help="with --json: put the attention maps in the JSON lines (no PNGs)"
    )
    args = parser.parse_args(argv)
    if (args.beams is not None and args.beams < 1) or args.batch_size < 1:
        parser.error("--beams and --batch-size must be ≥ 1")
    if args.maps and not args.json:
        parser.error("--maps puts the maps in the JSON lines: add --json (or use --attention DIR for PNGs)")
    generation = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}

    def skip(err: UnreadableImage) -> None:
        print(f"captioner-caption: skipping {err}", file=sys.stderr)

    with error_boundary("captioner-caption"):  # a bad saved decoding setting shows while captioning, too
        paths = collect_images(args.images)
        pngs = png_paths(paths, attention_folder(args.attention)) if args.attention else None
        pipeline = load(args.ckpt, device=args.device)
        results = pipeline.iter_captions(
            paths,
            args.beams,
            args.batch_size,
            on_unreadable=skip,
            attention=pngs is not None or args.maps,
            **generation,
        )
        for position, result in results:
            if pngs is not None:
                write_strip(paths[position], result, pngs[position])
                result = {**result, "attention_png": str(pngs[position])}
            print(output_line(paths[position], result, args.json), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
