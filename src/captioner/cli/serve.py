"""`captioner-serve --model CKPT_OR_DIR [--host 127.0.0.1] [--port 8000] [--max-batch N] [--max-upload-mb N]
[--max-queue N]`: a web page at `/` to caption an image, `GET /health`, `POST /caption` (see `captioner.server`)."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from captioner.api import load
from captioner.cli.boundary import error_boundary
from captioner.server import create_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captioner-serve", description=__doc__)
    parser.add_argument(
        "--model", required=True, help="a caption run's checkpoint (.ckpt) or exported directory"
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines too")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the log says which)")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests captioned by one model call")
    parser.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted request body")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="most requests waiting; more are refused with 503 + Retry-After",
    )
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.max_batch < 1 or args.max_upload_mb <= 0 or args.max_queue < 1:
        parser.error("--max-batch, --max-upload-mb and --max-queue must be positive")

    with error_boundary("captioner-serve"):
        model = load(args.model, device=args.device)
    app = create_app(
        model,
        max_batch=args.max_batch,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_queue=args.max_queue,
    )
    print(f"captioner-serve: {model!r}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
