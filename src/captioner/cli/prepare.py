"""`captioner-prepare {fineweb,coco,hellaswag,shapes,shapes-clip}`: download or generate data into the on-disk
formats (and, for the shapes world, the stand-in for a pretrained CLIP)."""

from __future__ import annotations

import argparse
import sys

from captioner.cli.boundary import error_boundary
from captioner.io import data_dir


def _fineweb(args) -> None:
    from captioner.prepare.fineweb import prepare_fineweb

    paths = prepare_fineweb(
        args.out,
        files=args.files,
        dataset=args.dataset,
        name=args.name,
        revision=args.revision,
        shard_size=args.shard_size,
        prefix=args.prefix,
        num_proc=args.num_proc,
        max_docs=args.max_docs,
    )
    print(f"{len(paths)} shards in {args.out}")


def _coco(args) -> None:
    from captioner.models.captioner import resolve_device
    from captioner.prepare.coco import prepare_coco

    args.device = str(resolve_device(args.device))
    prepare_coco(
        args.root,
        source=args.source,
        features=args.features,
        splits=tuple(args.splits),
        base_url=args.base_url,
        clip=args.clip,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    print(
        f"COCO ready in {args.root}" + (f" (CLIP features in {args.root}/features)" if args.features else "")
    )
    if args.karpathy:
        from captioner.prepare.karpathy import prepare_karpathy

        counts = prepare_karpathy(args.root, args.karpathy)
        print("Karpathy splits: " + ", ".join(f"karpathy_{s} {n:,} images" for s, n in counts.items()))


def _hellaswag(args) -> None:
    from captioner.prepare.hellaswag import download_hellaswag

    print(download_hellaswag(args.out, split=args.split, url=args.url))


def _shapes(args) -> None:
    from captioner.prepare.shapes import prepare_shapes

    outputs = prepare_shapes(
        args.out,
        seed=args.seed,
        train_tokens=args.train_tokens,
        n_train_images=args.train_images,
        n_val_images=args.val_images,
    )
    for key, path in outputs.items():
        print(f"{key}: {path}")


def _shapes_clip(args) -> None:
    import logging

    from captioner.shapes.clip import train_shapes_clip

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = train_shapes_clip(
        args.images, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    acc = report["val_accuracy"]
    print(
        f"stand-in CLIP in {args.out}: val cell accuracy {acc['cell']:.3f}, scene accuracy {acc['scene']:.3f}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="captioner-prepare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fineweb", help="tokenize FineWeb-Edu (or local parquet/jsonl) into uint16 shards")
    p.add_argument("--out", default=data_dir("edu_fineweb10B"))
    p.add_argument("--files", nargs="+", default=None, help="local .parquet/.jsonl files instead of the hub")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu")
    p.add_argument("--name", default="sample-10BT")
    p.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of the dataset (default: main; a resume keeps the commit it started from)",
    )
    p.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--prefix", default="edufineweb")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--max-docs", type=int, default=None)
    p.set_defaults(func=_fineweb)

    p = sub.add_parser("coco", help="download/verify/extract COCO 2017; optionally cache CLIP features")
    p.add_argument("--root", default=data_dir("coco"))
    p.add_argument(
        "--source", default=None, help="an existing COCO copy (zips or extracted) instead of downloading"
    )
    p.add_argument(
        "--base-url",
        default=None,
        help="a mirror of images.cocodataset.org with its layout (zips/..., annotations/...)",
    )
    p.add_argument("--features", action="store_true", help="also compute the CLIP feature cache")
    p.add_argument(
        "--karpathy",
        metavar="dataset_coco.json",
        default=None,
        help="then write Karpathy's splits as karpathy_{train,val,test} (annotations + image links)",
    )
    p.add_argument("--clip", default="openai/clip-vit-base-patch32")
    p.add_argument("--splits", nargs="+", default=["train2017", "val2017"])
    p.add_argument("--device", default=None, help="for --features: cuda | cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=8)
    p.set_defaults(func=_coco)

    p = sub.add_parser("hellaswag", help="download the HellaSwag val jsonl (rowanz/hellaswag)")
    p.add_argument("--out", default=data_dir("hellaswag"))
    p.add_argument("--split", default="val", help="val or train (the test split has no labels)")
    p.add_argument("--url", default=None, help="the jsonl's URL, for a mirror or proxy (default: GitHub)")
    p.set_defaults(func=_hellaswag)

    p = sub.add_parser("shapes", help="generate the embedded shapes world (text shards, HellaSwag, images)")
    p.add_argument("--out", default=data_dir("shapes"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-tokens", type=int, default=3_000_000)
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--val-images", type=int, default=200)
    p.set_defaults(func=_shapes)

    p = sub.add_parser(
        "shapes-clip",
        help="pretrain the tiny CLIP the shapes demo uses in place of openai/clip-vit-base-patch32",
    )
    p.add_argument(
        "--images", default=data_dir("shapes", "images"), help="the shapes world's COCO-format images"
    )
    p.add_argument(
        "--out", default=data_dir("shapes", "clip"), help="a save_pretrained directory (model.vision.clip)"
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_shapes_clip)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with error_boundary(f"captioner-prepare {args.command}"):  # missing files, failed downloads, bad data
        args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
