"""`captioner-caption --ckpt CKPT IMAGE_OR_DIR… [--beams N] [--max-new-tokens N] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from captioner.models.captioner import load_captioner
from captioner.models.vision import ClipPreprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, non-recursive); a missing path is an error."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"no such image or folder: {item}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captioner-caption", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="a caption run's checkpoint (.ckpt)")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    parser.add_argument("--beams", type=int, default=3, help="beam size (1 = greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="JSON lines {path, caption} instead of TSV")
    args = parser.parse_args(argv)

    try:
        paths = collect_images(args.images)
        model, _ = load_captioner(args.ckpt)
    except (OSError, ValueError) as err:
        print(f"captioner-caption: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    preprocess = ClipPreprocess(model.vision.image_size)
    method = {"method": "greedy"} if args.beams == 1 else {"method": "beam", "num_beams": args.beams}

    for start in range(0, len(paths), args.batch_size):
        chunk, pixels = [], []
        for path in paths[start : start + args.batch_size]:
            image = preprocess(path)  # None: unreadable, truncated or a decompression bomb
            if image is None:
                print(f"captioner-caption: skipping unreadable image {path}", file=sys.stderr)
                continue
            pixels.append(image)
            chunk.append(path)
        if not chunk:
            continue
        captions = model.caption(torch.stack(pixels).to(device), max_new_tokens=args.max_new_tokens, **method)
        for path, caption in zip(chunk, captions, strict=True):
            if args.json:
                print(json.dumps({"path": str(path), "caption": caption}))
            else:
                print(f"{path}\t{caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
