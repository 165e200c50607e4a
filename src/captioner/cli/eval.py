"""`captioner-eval {hellaswag,captions,coco}`: score a language model on HellaSwag, a captions results file, or a
captioner on a whole COCO-format split.

The last stdout line is always one JSON object, so scripts can read it with `tail -n 1`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from captioner.cli.boundary import error_boundary
from captioner.errors import UserError
from captioner.io import data_dir


def _hellaswag(args) -> dict:
    import torch

    from captioner.eval.hellaswag import evaluate_hellaswag
    from captioner.models.captioner import resolve_device
    from captioner.models.checkpoints import load_lm
    from captioner.models.gpt import GPT
    from captioner.prepare.hellaswag import download_hellaswag

    device = resolve_device(args.device)
    if args.ckpt and not Path(args.ckpt).is_file():
        raise UserError(f"checkpoint not found: {args.ckpt}")
    data = Path(args.data) if args.data else download_hellaswag(data_dir("hellaswag"), split="val")
    if not data.is_file():
        raise UserError(f"HellaSwag file not found: {data}")
    model = load_lm(args.ckpt) if args.ckpt else GPT.from_pretrained(args.hf)  # any stage-1 format
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls, as build-nanogpt evaluates
    model.to(device)
    return evaluate_hellaswag(model, data, limit=args.limit, batch_size=args.batch_size, device=device)


def _captions(args) -> dict:
    from captioner.eval.caption_metrics import score_results_file

    overall, _ = score_results_file(args.pred, args.ann, backend=args.backend)
    return overall


def _coco(args) -> dict:
    from captioner.eval.coco_split import evaluate_split

    root = args.root or data_dir("coco")
    result = evaluate_split(
        args.ckpt,
        root,
        args.split,
        out=args.out,
        beams=args.beams,
        batch_size=args.batch_size,
        device=args.device,
        backend=args.backend,
        num_workers=args.num_workers,
    )
    print(f"captioner-eval coco: results in {result.results_path} ({result.source})", file=sys.stderr)
    speed = result.images_per_sec
    extra = {
        "n": result.n,
        "skipped": result.skipped,
        "images_per_sec": None if speed is None else round(speed, 2),
    }
    return {**result.scores, **extra}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner-eval", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("hellaswag", help="HellaSwag acc / acc_norm of a stage-1 checkpoint or an HF GPT-2")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="stage-1 Lightning checkpoint (.ckpt)")
    source.add_argument("--hf", help="HF GPT-2: hub name (e.g. gpt2) or a save_pretrained directory")
    p.add_argument(
        "--data", help="HellaSwag-format jsonl (default: download val into $CAPTIONER_DATA_DIR/hellaswag/)"
    )
    p.add_argument("--limit", type=_positive_int, default=None, help="score only the first N examples")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="examples per forward pass")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.set_defaults(func=_hellaswag)

    p = sub.add_parser("captions", help="BLEU/METEOR/ROUGE-L/CIDEr-D of a COCO results file")
    p.add_argument("--pred", required=True, help='COCO results json: [{"image_id": …, "caption": …}, …]')
    p.add_argument("--ann", required=True, help="COCO captions json (e.g. captions_val2017.json)")
    p.add_argument("--backend", choices=("auto", "pycocoevalcap", "python"), default="auto")
    p.set_defaults(func=_captions)

    p = sub.add_parser("coco", help="caption a whole COCO-format split with a captioner and score it")
    p.add_argument("--ckpt", required=True, help="caption checkpoint (.ckpt) or exported captioner directory")
    p.add_argument(
        "--root",
        help="holds <split>/ and annotations/captions_<split>.json (default: $CAPTIONER_DATA_DIR/coco or data/coco)",
    )
    p.add_argument("--split", default="val2017", help="val2017 (COCO; default) or val (the shapes world)")
    p.add_argument(
        "--out",
        help="COCO results json (default: <root>/results/<split>_<ckpt stem>_<digest of weights + decoding>.json)",
    )
    p.add_argument(
        "--beams", type=_positive_int, default=None, help="beam size (1 = greedy; default: checkpoint's)"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per generate call")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "pycocoevalcap", "python"), default="auto")
    p.add_argument(
        "--num-workers",
        type=_non_negative_int,
        default=None,
        help="image decoding processes (default: up to 4; none with a feature cache)",
    )
    p.set_defaults(func=_coco)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with error_boundary(f"captioner-eval {args.command}"):
        result = args.func(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
