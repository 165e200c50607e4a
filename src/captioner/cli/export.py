"""`captioner-export --ckpt CKPT --out DIR [--force] [--push-to-hub REPO [--private]]`.

A stage-1 checkpoint becomes a transformers GPT-2 directory (`AutoModelForCausalLM.from_pretrained(DIR)`, HF
`generate`, pipelines, lm-evaluation-harness); a caption checkpoint becomes a captioner directory
(`captioner.load(DIR)`, `captioner-caption --ckpt DIR`). Exit status: 0 done, 2 nothing written (bad input),
1 exported but the upload failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from captioner.cli.boundary import error_boundary
from captioner.models.export import CAPTION, LM, export_checkpoint

PROG = "captioner-export"
DESCRIPTIONS = {
    LM: "stage-1 language model → transformers GPT2LMHeadModel + GPT-2 tokenizer",
    CAPTION: "caption checkpoint → captioner directory (captioner.json + model.safetensors)",
}


def push_to_hub(folder: Path, repo: str, private: bool) -> str:
    """Upload `folder` to the hub model repo `repo` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=folder, repo_id=repo, repo_type="model", commit_message=f"{PROG}")
    return str(getattr(commit, "commit_url", commit))


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--ckpt", required=True, help="a stage-1 or caption run's Lightning checkpoint (.ckpt)"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="directory to create (must be absent or empty)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace a non-empty --out (once the export is done)"
    )
    parser.add_argument(
        "--push-to-hub", metavar="REPO", help="then upload --out to this hub repo (user/name)"
    )
    parser.add_argument("--private", action="store_true", help="create the hub repo private")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr is for errors only: one line each, as the tests expect

    with error_boundary(PROG):  # missing/unreadable/wrong checkpoint, --out taken
        kind = export_checkpoint(args.ckpt, args.out, force=args.force)
    print(f"{args.out}: {DESCRIPTIONS[kind]}")
    if args.push_to_hub:
        try:
            url = push_to_hub(Path(args.out), args.push_to_hub, args.private)
        except Exception as err:  # offline, no token, no permission: every way an upload fails ends here
            print(
                f"{PROG}: exported to {args.out}, but the upload to {args.push_to_hub} failed ({first_line(err)})",
                file=sys.stderr,
            )
            return 1
        print(f"uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
