"""`captioner-caption --ckpt CKPT IMAGE_OR_DIR… [--beams N] [--max-new-tokens N] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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

    import torch

    from captioner.data.coco import clip_transform, load_image
    from captioner.modules.caption import CaptionModule
    from captioner.tokenizer import EOT, gpt2_encoding

    try:
        paths = collect_images(args.images)
        if not Path(args.ckpt).is_file():
            raise FileNotFoundError(f"no such checkpoint: {args.ckpt}")
    except FileNotFoundError as err:
        print(f"captioner-caption: {err}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = CaptionModule.load_from_checkpoint(args.ckpt, map_location=device, weights_only=True)
    model = module.model.to(device).eval()
    transform = clip_transform(model.vision.image_size)
    enc = gpt2_encoding()
    method = {"method": "greedy"} if args.beams == 1 else {"method": "beam", "num_beams": args.beams}

    for start in range(0, len(paths), args.batch_size):
        chunk, pixels = [], []
        for path in paths[start : start + args.batch_size]:
            image = load_image(path)  # None: unreadable, truncated or a decompression bomb
            if image is None:
                print(f"captioner-caption: skipping unreadable image {path}", file=sys.stderr)
                continue
            pixels.append(transform(image))
            chunk.append(path)
        if not chunk:
            continue
        with torch.no_grad():
            ids = model.generate(
                pixel_values=torch.stack(pixels).to(device), max_new_tokens=args.max_new_tokens, **method
            )
        for path, seq in zip(chunk, ids, strict=True):
            caption = enc.decode([t for t in seq if t != EOT]).strip()
            if args.json:
                print(json.dumps({"path": str(path), "caption": caption}))
            else:
                print(f"{path}\t{caption}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
