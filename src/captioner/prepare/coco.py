"""`captioner-prepare coco`: fetch (or take an existing copy of) COCO 2017, verify and extract it atomically,
validate its caption annotations, and optionally build the CLIP feature cache."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

from captioner.data.coco_format import load_captions
from captioner.data.feature_cache import build_feature_cache
from captioner.errors import UserError
from captioner.io import save_text
from captioner.models.vision import VisionEncoder
from captioner.prepare.download import check_zip, download, progress_bar

log = logging.getLogger(__name__)

BASE_URL = "http://images.cocodataset.org"  # prepare_coco(base_url=...): a mirror with the same layout
COCO_PATHS = {
    "train2017.zip": "zips/train2017.zip",
    "val2017.zip": "zips/val2017.zip",
    "annotations_trainval2017.zip": "annotations/annotations_trainval2017.zip",
}
# The published MD5s, as PaddlePaddle/PaddleDetection (ppdet/utils/download.py) and mlverse/torchvision
# (R/dataset-coco.R) list them; the two agree. Module-level so tests can point them at their own zips.
COCO_MD5 = {
    "train2017.zip": "cced6f7f71b7629ddf16f17bbcfab6b2",
    "val2017.zip": "442b8da7639aecaf257c1dceb8ba8c80",
    "annotations_trainval2017.zip": "f4bbac642086de4f52a3fdda2de5fa2c",
}
ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
COCO_SPLITS = ("train2017", "val2017")
DONE_MARKER = ".captioner-complete"  # written inside an extracted directory before it is renamed into place


def _archive_top(name: str) -> str:
    """The directory of the dataset root an archive fills (`train2017.zip` → `train2017`)."""
    return "annotations" if name == ANNOTATIONS_ZIP else name.removesuffix(".zip")


def _wanted(member: str, top: str) -> bool:
    # The annotations zip also carries instance/keypoint files (~450 MB) that captioning never reads.
    if top == "annotations":
        return member.startswith("annotations/captions_") and member.endswith(".json")
    return member.startswith(f"{top}/")


def extract_zip(zip_path: str | Path, root: str | Path, top: str) -> Path:
    """Extract the `top/` members of a zip into `root/top`, atomically: into a temporary directory first, marked
    complete there, then renamed into place, so `root/top` never exists half-written."""
    from rich.progress import Progress

    zip_path, root = Path(zip_path), Path(root)
    tmp = root / f".extract-{top}"
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(zip_path) as zf:
        members = [m for m in zf.infolist() if _wanted(m.filename, top)]
        if not any(not m.is_dir() for m in members):
            raise UserError(f"{zip_path}: no files under {top}/ in this zip")
        with progress_bar(*Progress.get_default_columns()) as progress:
            for member in progress.track(members, description=f"extract {zip_path.name}"):
                zf.extract(member, tmp)
    save_text(tmp / top / DONE_MARKER, f"{zip_path.name}\n")
    os.replace(tmp / top, root / top)
    shutil.rmtree(tmp)
    return root / top


def _is_done(root: Path, top: str) -> bool:
    """Extracted by us (marker inside), or a symlink to an existing copy (`source=`)."""
    path = root / top
    return (path / DONE_MARKER).exists() or (path.is_symlink() and path.is_dir())


def _source_dir_ok(directory: Path, top: str, splits: Sequence[str]) -> bool:
    if top == "annotations":
        return all((directory / f"captions_{split}.json").is_file() for split in splits)
    return directory.is_dir()


def prepare_coco(
    root: str | Path,
    *,
    source: str | Path | None = None,
    features: bool = False,
    splits: Sequence[str] = COCO_SPLITS,
    keep_zips: bool = False,
    retries: int = 3,
    base_url: str | None = None,
    clip: str = "openai/clip-vit-base-patch32",
    features_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 4,
) -> None:
    """Make `root` a COCO 2017 caption root (`root/<split>/`, `root/annotations/captions_<split>.json`).

    Without `source`: download each zip from `base_url` (default COCO's host; a mirror with its layout) into
    `root/downloads/` (resumable), check its size, MD5 and CRCs, extract atomically, then delete the zip unless
    `keep_zips`. With `source=DIR`: use an existing copy there, either extracted (`DIR/train2017/`,
    `DIR/annotations/...`: symlinked into `root`) or zipped (`DIR/train2017.zip` ...: verified and extracted);
    nothing is downloaded. Finished parts are skipped, so re-running is cheap.
    Finally the annotations are loaded and validated. `features=True` then builds the CLIP feature cache of each
    split with the `clip` model (hub name or local dir) into `features_dir` (default `root/features`).
    """
    root = Path(root)
    unknown = [s for s in splits if s not in COCO_SPLITS]
    if unknown:
        raise UserError(f"unknown COCO split(s) {unknown}; expected some of {COCO_SPLITS}")
    with _progress_log():
        start = time.perf_counter()
        origin = f"from the copy in {source}" if source is not None else "downloading what is missing"
        log.info("COCO 2017 %s into %s, %s", " + ".join(splits), root, origin)
        root.mkdir(parents=True, exist_ok=True)
        names = [f"{split}.zip" for split in splits] + [ANNOTATIONS_ZIP]
        for i, name in enumerate(names, 1):
            top = _archive_top(name)
            step = f"[{i}/{len(names)}] {name}"
            if _is_done(root, top):
                log.info("%s: already in place (%s)", step, root / top)
                continue
            if source is not None:
                _use_source(Path(source), root, name, top, splits, step)
                continue
            if (root / top).exists():
                raise UserError(
                    f"{root / top} exists but was not written by captioner-prepare; remove it, or pass "
                    f"source={root} to use it as it is"
                )
            url = f"{(base_url or BASE_URL).rstrip('/')}/{COCO_PATHS[name]}"
            log.info("%s: downloading %s into %s", step, url, root / "downloads")
            zip_path = download(url, root / "downloads" / name, retries=retries)
            try:
                _verify(zip_path, step)
            except ValueError as err:
                zip_path.unlink()  # a fresh download is the only fix
                raise UserError(f"{err}; deleted it, re-run to download it again") from err
            _extract(zip_path, root, top, step)
            if not keep_zips:
                zip_path.unlink()
                log.info("%s: deleted the zip (%s)", step, zip_path)
        summary = []
        for split in splits:
            index = load_captions(root, split)
            summary.append(f"{split}: {len(index.image_ids):,} images, {len(index.caption_image):,} captions")
            log.info("annotations valid, %s", summary[-1])
        if features:
            out_dir = Path(features_dir) if features_dir else root / "features"
            _build_features(
                root, splits, out_dir, clip=clip, device=device, batch_size=batch_size, workers=num_workers
            )
            summary.append(f"CLIP features in {out_dir}")
        log.info("COCO ready in %s (%.0f s): %s", root, time.perf_counter() - start, "; ".join(summary))


@contextlib.contextmanager
def _progress_log():
    """Show this package's INFO lines (these steps, the feature cache's) on stderr while preparing, unless the
    caller has set logging up (then its handlers and levels decide): `captioner-prepare` configures none."""
    package = logging.getLogger("captioner")
    if package.hasHandlers():
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


def _verify(zip_path: Path, step: str) -> None:
    size = zip_path.stat().st_size / 1e9
    log.info("%s: verifying %s (%.1f GB: its MD5 and the CRC of every member)", step, zip_path, size)
    check_zip(zip_path, md5=COCO_MD5[zip_path.name])


def _extract(zip_path: Path, root: Path, top: str, step: str) -> None:
    start = time.perf_counter()
    extract_zip(zip_path, root, top)
    log.info("%s: extracted into %s (%.0f s)", step, root / top, time.perf_counter() - start)


def _use_source(source: Path, root: Path, name: str, top: str, splits: Sequence[str], step: str) -> None:
    """Bring one archive's directory from an existing copy: symlink an extracted one, or verify + extract a zip."""
    if _source_dir_ok(source / top, top, splits):
        if (source / top).resolve() != (root / top).resolve():
            if (root / top).is_symlink():
                (root / top).unlink()  # a stale link from an earlier source
            (root / top).symlink_to((source / top).resolve(), target_is_directory=True)
        log.info("%s: using the extracted copy %s", step, source / top)
        return
    if (source / name).is_file():
        _verify(source / name, step)
        if (root / top).exists():
            raise UserError(f"{root / top} exists but was not written by captioner-prepare; remove it")
        _extract(source / name, root, top, step)
        return
    raise UserError(
        f"source {source}: neither {source / top}/ (extracted) nor {source / name} (zip) is there"
    )


def _build_features(root, splits, out_dir, *, clip, device, batch_size, workers) -> None:
    # The cache holds `encode` outputs (CLIP's own tokens): the projection and its width play no part.
    log.info("CLIP features: loading %s", clip)
    encoder = VisionEncoder(768, clip=clip).requires_grad_(False)
    for split in splits:
        log.info("CLIP features of %s on %s into %s", split, device, out_dir)
        build_feature_cache(
            encoder,
            root,
            split,
            out_dir,
            image_size=encoder.image_size,
            batch_size=batch_size,
            device=device,
            num_workers=workers,
        )
