"""COCO-format caption data: fetch and verify COCO 2017, CLIP preprocessing, caption tokens, the DataModule.

A caption dataset root holds images at `root/<split>/<file_name>` and annotations at
`root/annotations/captions_<split>.json` (COCO captions format: `images` [{id, file_name, ...}], `annotations`
[{id, image_id, caption}]). COCO 2017's splits are train2017/val2017; the shapes world writes train/val in the
same layout, so both load through `CocoCaptionDataModule` unchanged.

Batches (see `CaptionCollate`): B images/captions, T the longest caption in the batch, S the image side,
N image tokens and D their width when serving cached CLIP features.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import requests
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from captioner.io import save_text
from captioner.tokenizer import EOT, gpt2_encoding

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# download, verify, extract

# Module-level so tests (and mirrors) can point them elsewhere.
COCO_URLS = {
    "train2017.zip": "http://images.cocodataset.org/zips/train2017.zip",
    "val2017.zip": "http://images.cocodataset.org/zips/val2017.zip",
    "annotations_trainval2017.zip": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
}
ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
COCO_SPLITS = ("train2017", "val2017")
DONE_MARKER = ".captioner-complete"  # written inside an extracted directory before it is renamed into place


class DownloadError(OSError):
    """A transfer ended short or inconsistent; the `.part` file is kept so that a retry resumes it."""


RETRYABLE = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    DownloadError,
)


def download(
    url: str, dest: str | Path, *, retries: int = 3, chunk_size: int = 1 << 16, timeout: float = 60
) -> Path:
    """Download `url` to `dest` and return `dest`; a `dest` already there is taken as complete.

    Bytes go to `dest.part`, which survives failures: each retry (and each later call) resumes it with an HTTP
    Range request. The final size must equal the size the server announced; only then is the part file renamed
    onto `dest`.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, chunk_size=chunk_size, timeout=timeout)
            break
        except RETRYABLE as err:
            if attempt == retries:
                message = (
                    f"{url}: giving up after {retries + 1} attempts ({err}); {part} is kept, re-run to resume"
                )
                raise DownloadError(message) from err
            log.warning("%s: %s; resuming (attempt %d of %d)", url, err, attempt + 2, retries + 1)
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, *, chunk_size: int, timeout: float) -> None:
    """One HTTP request that appends to (or restarts) `part`; raises DownloadError if it ends short."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        # 416 Range Not Satisfiable: the part is already whole, or longer than the remote file.
        if resp.status_code == 416:
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            if total == have:
                return
            part.unlink()
            raise DownloadError(
                f"{url}: {part} ({have} bytes) does not fit the remote size {total}; restarting"
            )
        resp.raise_for_status()
        if resp.status_code == 206:
            start = int(re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", "bytes 0-")).group(1))
            if start != have:
                raise DownloadError(
                    f"{url}: asked to resume at byte {have}, server answered from byte {start}"
                )
            total = _content_range_total(resp.headers["Content-Range"])
            mode = "ab"
        else:  # 200: the server ignored the Range header, so start over
            have, mode = 0, "wb"
            total = int(resp.headers["Content-Length"]) if "Content-Length" in resp.headers else None
        columns = (
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
        )
        with open(part, mode) as f, Progress(*columns) as progress:
            task = progress.add_task(Path(part.name).stem, total=total, completed=have)
            for chunk in resp.iter_content(chunk_size=chunk_size):
                f.write(chunk)
                progress.advance(task, len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise DownloadError(f"{url}: {part} has {size} bytes, the server announced {total}")


def _content_range_total(value: str) -> int | None:
    """The total size from a Content-Range header ("bytes 0-99/1234" or "bytes */1234")."""
    match = re.search(r"/(\d+)\s*$", value)
    return int(match.group(1)) if match else None


def check_zip(path: str | Path) -> None:
    """Read every member of a zip and check its CRC; ValueError naming the file (and member) if any fails."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise ValueError(f"{path}: corrupt zip ({err})") from err
    if bad is not None:
        raise ValueError(f"{path}: corrupt zip, member {bad!r} fails its CRC check")


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
            raise ValueError(f"{zip_path}: no files under {top}/ in this zip")
        with Progress() as progress:
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
    clip: str = "openai/clip-vit-base-patch32",
    features_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    num_workers: int = 4,
) -> None:
    """Make `root` a COCO 2017 caption root (`root/<split>/`, `root/annotations/captions_<split>.json`).

    Without `source`: download each zip into `root/downloads/` (resumable), check its size and CRCs, extract
    atomically, then delete the zip unless `keep_zips`. With `source=DIR`: use an existing copy there, either
    extracted (`DIR/train2017/`, `DIR/annotations/...`: symlinked into `root`) or zipped (`DIR/train2017.zip`
    ...: verified and extracted); nothing is downloaded. Finished parts are skipped, so re-running is cheap.
    Finally the annotations are loaded and validated. `features=True` then builds the CLIP feature cache of each
    split with the `clip` model (hub name or local dir) into `features_dir` (default `root/features`).
    """
    root = Path(root)
    unknown = [s for s in splits if s not in COCO_SPLITS]
    if unknown:
        raise ValueError(f"unknown COCO split(s) {unknown}; expected some of {COCO_SPLITS}")
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"{split}.zip" for split in splits] + [ANNOTATIONS_ZIP]:
        top = _archive_top(name)
        if _is_done(root, top):
            log.info("%s: already in place", root / top)
            continue
        if source is not None:
            _use_source(Path(source), root, name, top, splits)
            continue
        if (root / top).exists():
            raise FileExistsError(
                f"{root / top} exists but was not written by captioner-prepare; remove it, or pass "
                f"source={root} to use it as it is"
            )
        zip_path = download(COCO_URLS[name], root / "downloads" / name, retries=retries)
        try:
            check_zip(zip_path)
        except ValueError as err:
            zip_path.unlink()  # a fresh download is the only fix
            raise ValueError(f"{err}; deleted it, re-run to download it again") from err
        extract_zip(zip_path, root, top)
        if not keep_zips:
            zip_path.unlink()
    for split in splits:
        index = load_captions(root, split)
        log.info("%s: %d images, %d captions", split, len(index.image_ids), len(index.caption_image))
    if features:
        out_dir = Path(features_dir) if features_dir else root / "features"
        _build_features(
            root, splits, out_dir, clip=clip, device=device, batch_size=batch_size, workers=num_workers
        )


def _use_source(source: Path, root: Path, name: str, top: str, splits: Sequence[str]) -> None:
    """Bring one archive's directory from an existing copy: symlink an extracted one, or verify + extract a zip."""
    if _source_dir_ok(source / top, top, splits):
        if (source / top).resolve() != (root / top).resolve():
            if (root / top).is_symlink():
                (root / top).unlink()  # a stale link from an earlier source
            (root / top).symlink_to((source / top).resolve(), target_is_directory=True)
        return
    if (source / name).is_file():
        check_zip(source / name)
        if (root / top).exists():
            raise FileExistsError(f"{root / top} exists but was not written by captioner-prepare; remove it")
        extract_zip(source / name, root, top)
        return
    raise FileNotFoundError(
        f"source {source}: neither {source / top}/ (extracted) nor {source / name} (zip) is there"
    )


def _build_features(root, splits, out_dir, *, clip, device, batch_size, workers) -> None:
    from captioner.data.features import build_feature_cache
    from captioner.models.vision import VisionEncoder

    # The cache holds `encode` outputs (CLIP's own tokens): the projection and its width play no part.
    encoder = VisionEncoder(768, clip=clip).requires_grad_(False)
    for split in splits:
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


# ----------------------------------------------------------------------------------------------------------------
# preprocessing: images and captions

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_transform(image_size: int = 224):
    """CLIP's preprocessing: RGB, shortest side to `image_size` (bicubic, antialiased), centre crop, [0, 1]
    floats, CLIP mean/std. PIL image in, plain (3, S, S) float32 tensor out."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RGB(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=CLIP_MEAN, std=CLIP_STD),
            v2.ToPureTensor(),
        ]
    )


def normalize_caption(text: str) -> str:
    """Strip, collapse whitespace, lowercase, drop trailing periods: "A dog  runs. " → "a dog runs"."""
    return " ".join(text.split()).lower().rstrip(". ")


def encode_caption(text: str, enc, max_tokens: int) -> list[int]:
    """Token sequence of one caption: [EOT] + BPE(normalize_caption(text)) + [EOT], at most `max_tokens + 1` long.

    The leading EOT is the "start" the model conditions on; the trailing EOT teaches it to stop. The sequence
    yields `max_tokens` (input, label) positions. A caption too long to fit loses its tail *and* its final EOT:
    a cut caption does not end there, so the model must not learn to stop there.
    """
    return _wrap(enc.encode_ordinary(normalize_caption(text)), max_tokens)


def _wrap(tokens: list[int], max_tokens: int) -> list[int]:
    return ([EOT, *tokens, EOT])[: max_tokens + 1]


def encode_captions(texts: Sequence[str], enc, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """`encode_caption` for many captions at once: (flat int32 tokens, int64 offsets of length len(texts) + 1).

    Flat arrays rather than lists of lists: DataLoader workers then share them copy-on-write.
    """
    if max_tokens < 1:
        raise ValueError(f"max_caption_tokens must be >= 1, got {max_tokens}")
    seqs = [_wrap(t, max_tokens) for t in enc.encode_ordinary_batch([normalize_caption(s) for s in texts])]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


# ----------------------------------------------------------------------------------------------------------------
# annotations


@dataclass
class CaptionIndex:
    """One split's annotations, validated. Images keep the annotation file's order; captions are grouped by
    image (caption c belongs to image `caption_image[c]`, image i owns captions `offsets[i]:offsets[i+1]`)."""

    path: Path  # the annotation file, for messages
    image_dir: Path
    image_ids: list[int]
    position: dict[int, int]  # image id -> position in image_ids
    file_names: list[str]
    captions: list[str]  # raw text, grouped by image
    caption_image: np.ndarray  # (num_captions,) int64 image position of each caption
    offsets: np.ndarray  # (num_images + 1,) int64

    def image_captions(self, i: int) -> list[str]:
        return self.captions[self.offsets[i] : self.offsets[i + 1]]

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.file_names[i]


def annotation_path(root: str | Path, split: str) -> Path:
    return Path(root) / "annotations" / f"captions_{split}.json"


def _check_fields(record, fields: dict[str, type], where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object, got {type(record).__name__}")
    for key, kind in fields.items():
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}")
        value = record[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{where}: key {key!r} must be {kind.__name__}, got {value!r}")


def load_captions(root: str | Path, split: str, prepare_hint: str = "captioner-prepare coco") -> CaptionIndex:
    """Read and validate `root/annotations/captions_<split>.json`.

    Missing root or file → FileNotFoundError naming it and `prepare_hint`; bad JSON, missing keys, wrong types,
    a caption of an unknown image, duplicate image ids or an empty split → ValueError naming the file and the
    offending key or value.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"caption data root not found: {root} (run `{prepare_hint}`)")
    path = annotation_path(root, split)
    if not path.is_file():
        raise FileNotFoundError(f"caption annotations not found: {path} (run `{prepare_hint}`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{path}: missing top-level key {key!r}")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: top-level key {key!r} must be a list, got {type(data[key]).__name__}")
    if not data["images"]:
        raise ValueError(f"{path}: split {split!r} is empty ('images' is an empty list)")
    if not data["annotations"]:
        raise ValueError(f"{path}: split {split!r} has no captions ('annotations' is an empty list)")

    position: dict[int, int] = {}
    file_names = []
    for i, image in enumerate(data["images"]):
        _check_fields(image, {"id": int, "file_name": str}, f"{path}: images[{i}]")
        if image["id"] in position:
            raise ValueError(f"{path}: images[{i}] repeats image id {image['id']}")
        position[image["id"]] = i
        file_names.append(image["file_name"])
    grouped: list[list[str]] = [[] for _ in file_names]
    for j, ann in enumerate(data["annotations"]):
        _check_fields(ann, {"image_id": int, "caption": str}, f"{path}: annotations[{j}]")
        if ann["image_id"] not in position:
            raise ValueError(
                f"{path}: annotations[{j}] has image_id {ann['image_id']}, which is not in 'images'"
            )
        grouped[position[ann["image_id"]]].append(ann["caption"])

    counts = np.array([len(g) for g in grouped], dtype=np.int64)
    offsets = np.zeros(len(grouped) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return CaptionIndex(
        path=path,
        image_dir=root / split,
        image_ids=list(position),
        position=position,
        file_names=file_names,
        captions=[c for g in grouped for c in g],
        caption_image=np.repeat(np.arange(len(grouped), dtype=np.int64), counts),
        offsets=offsets,
    )


# ----------------------------------------------------------------------------------------------------------------
# datasets


def load_image(path: str | Path) -> Image.Image | None:
    """Decode an image fully, or None if it is missing, corrupt, truncated or a decompression bomb.

    PIL only warns between MAX_IMAGE_PIXELS and twice that; the warning is raised here so bombs are refused at
    the limit itself.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now: Image.open reads only the header, truncation shows up here
                return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None


class ImageSource:
    """Where one split's image tensors come from: decoded + CLIP-preprocessed files ("pixel_values", (3, S, S)
    float32), or the CLIP feature cache ("features", (N, D) float32, no image decoding at all)."""

    def __init__(self, index: CaptionIndex, *, image_size: int, features=None):
        self.index = index
        self.features = features  # a FeatureStore, or None
        self.transform = None if features is not None else clip_transform(image_size)
        self.key = "features" if features is not None else "pixel_values"
        self.shape = tuple(features.shape[1:]) if features is not None else (3, image_size, image_size)

    def load(self, i: int) -> torch.Tensor | None:
        """Image i's tensor, or None when it cannot be read (or was unreadable when the cache was built)."""
        if self.features is not None:
            feats = self.features.get(self.index.image_ids[i])
            return None if feats is None else torch.from_numpy(feats).float()  # (N, D)
        image = load_image(self.index.image_path(i))
        return None if image is None else self.transform(image)  # (3, S, S)


class CaptionPairs(Dataset):
    """Item c = caption c of the split with its image. Which captions an epoch visits is the sampler's choice.

    Returns {key: image tensor, "input_ids": (L,), "labels": (L,), "image_id"}, with labels[t] the token after
    input_ids[t]; or, for an unreadable image, the sentinel {"skipped": file_name, "image_id"}.
    """

    def __init__(
        self, index: CaptionIndex, tokens: np.ndarray, token_offsets: np.ndarray, source: ImageSource
    ):
        self.index, self.tokens, self.token_offsets, self.source = index, tokens, token_offsets, source

    def __len__(self) -> int:
        return len(self.index.caption_image)

    def __getitem__(self, c: int) -> dict:
        i = int(self.index.caption_image[c])
        image_id = self.index.image_ids[i]
        image = self.source.load(i)
        if image is None:
            return {"skipped": self.index.file_names[i], "image_id": image_id}
        seq = torch.from_numpy(
            self.tokens[self.token_offsets[c] : self.token_offsets[c + 1]].astype(np.int64)
        )
        return {self.source.key: image, "input_ids": seq[:-1], "labels": seq[1:], "image_id": image_id}


@dataclass
class CaptionCollate:
    """Stack items into a batch, padding captions to the longest one; unreadable images are dropped and named.

    Batch: {key: (B, *image_shape) float32, "input_ids": (B, T) int64 padded with EOT, "labels": (B, T) int64
    padded with -100 (ignored by the loss; the EOT padding is never a target), "image_ids": (B,) int64,
    "skipped": [file names]}. B can be 0 when every image of a batch was unreadable.
    """

    key: str
    image_shape: tuple[int, ...]

    def __call__(self, items: list[dict]) -> dict:
        good = [it for it in items if "skipped" not in it]
        B = len(good)
        T = max((len(it["input_ids"]) for it in good), default=0)
        input_ids = torch.full((B, T), EOT, dtype=torch.int64)  # (B, T)
        labels = torch.full((B, T), -100, dtype=torch.int64)  # (B, T)
        for b, it in enumerate(good):
            n = len(it["input_ids"])
            input_ids[b, :n] = it["input_ids"]
            labels[b, :n] = it["labels"]
        images = torch.stack([it[self.key] for it in good]) if good else torch.empty(0, *self.image_shape)
        return {
            self.key: images,  # (B, 3, S, S) or (B, N, D)
            "input_ids": input_ids,
            "labels": labels,
            "image_ids": torch.tensor([it["image_id"] for it in good], dtype=torch.int64),  # (B,)
            "skipped": [it["skipped"] for it in items if "skipped" in it],
        }


class CaptionSampler(Sampler[int]):
    """The caption indices one rank visits in one epoch, seeded by (seed, epoch), resumable by whole batches.

    mode "all": every caption once per epoch; mode "one": one caption per image, drawn per epoch. With `shuffle`
    the order is a permutation drawn from (seed, epoch); every rank draws the same one and takes every
    world_size-th item from its rank on (training drops the tail so all ranks get equally many batches, which
    DDP needs; validation keeps everything, so each pair counts exactly once).

    `skip_batches` drops the first batches of epoch `epoch` only (a mid-epoch resume) by slicing indices, so no
    image is decoded for them. `__len__` keeps counting them: Lightning resumes its own batch counter at the
    same place and ends the epoch when that counter reaches `len(dataloader)`.
    """

    def __init__(
        self,
        index: CaptionIndex,
        *,
        mode: str = "all",
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_tail: bool = True,
        batch_size: int = 1,
        skip_batches: int = 0,
    ):
        if mode not in ("all", "one"):
            raise ValueError(f"captions_per_epoch must be 'all' or 'one', got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.index, self.mode, self.shuffle, self.seed = index, mode, shuffle, seed
        self.rank, self.world_size, self.drop_tail, self.batch_size = rank, world_size, drop_tail, batch_size
        self.epoch, self.skip_batches = epoch, skip_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip_batches = 0  # the resume offset belongs to the epoch that was interrupted
        self.epoch = epoch

    def epoch_order(self) -> np.ndarray:
        """All ranks' caption indices for this epoch, before the rank split."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.mode == "all":
            order = np.arange(len(self.index.caption_image))
            return rng.permutation(order) if self.shuffle else order
        counts = np.diff(self.index.offsets)
        images = np.flatnonzero(counts)  # images without captions have nothing to train on
        picks = self.index.offsets[images] + (rng.random(len(images)) * counts[images]).astype(np.int64)
        return rng.permutation(picks) if self.shuffle else picks

    def rank_order(self) -> np.ndarray:
        order = self.epoch_order()
        if self.drop_tail:
            order = order[: len(order) // self.world_size * self.world_size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self.rank_order()[self.skip_batches * self.batch_size :]
        return iter(order.tolist())

    def __len__(self) -> int:
        # "one" draws a caption for every image that has one
        n = (
            len(self.index.caption_image)
            if self.mode == "all"
            else int(np.count_nonzero(np.diff(self.index.offsets)))
        )
        if self.drop_tail:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))


# ----------------------------------------------------------------------------------------------------------------
# the DataModule


@dataclass
class _Split:
    index: CaptionIndex
    source: ImageSource
    dataset: CaptionPairs


class CocoCaptionDataModule(L.LightningDataModule):
    """COCO-format (image, caption) pairs for the caption stage.

    Training visits every pair per epoch or one caption per image (`captions_per_epoch`), in a (seed, epoch)
    shuffled order split across DDP ranks by the sampler itself (Lightning runs with
    use_distributed_sampler=False), resumable mid-epoch from `state_dict`. Validation: all val pairs, in order,
    split across ranks. With `features_dir` the loaders serve cached CLIP tokens ("features") instead of pixels.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train2017",
        val_split: str = "val2017",
        batch_size: int = 32,
        num_workers: int = 4,
        image_size: int = 224,
        max_caption_tokens: int = 48,
        captions_per_epoch: str = "all",
        features_dir: str | None = None,
        val_gen_images: int = 100,
        seed: int = 1234,
        prepare_hint: str = "captioner-prepare coco",
    ):
        super().__init__()
        if captions_per_epoch not in ("all", "one"):
            raise ValueError(f"data.captions_per_epoch must be 'all' or 'one', got {captions_per_epoch!r}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        # Plain strings, not Paths: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "root": str(root),
                "train_split": train_split,
                "val_split": val_split,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "image_size": image_size,
                "max_caption_tokens": max_caption_tokens,
                "captions_per_epoch": captions_per_epoch,
                "features_dir": None if features_dir is None else str(features_dir),
                "val_gen_images": val_gen_images,
                "seed": seed,
                "prepare_hint": prepare_hint,
            }
        )
        self._splits: dict[str, _Split] = {}
        # {"epoch", "batches"} from a checkpoint: where the train loader of that epoch starts
        self._resume: dict | None = None

    # --- loading ------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", None):
            self._split(self.hparams.train_split)
        self._split(self.hparams.val_split)

    def _split(self, name: str) -> _Split:
        if name not in self._splits:
            self._splits[name] = self._load_split(name)
        return self._splits[name]

    def _load_split(self, name: str) -> _Split:
        hp = self.hparams
        index = load_captions(hp.root, name, hp.prepare_hint)
        features = None
        if hp.features_dir is not None:
            from captioner.data.features import FeatureStore

            features = FeatureStore(hp.features_dir, name)
            missing = [i for i in index.image_ids if i not in features]
            if missing:
                raise ValueError(
                    f"{features.meta_path}: no cached features for {len(missing)} image(s) of {index.path} "
                    f"(first: image_id {missing[0]}); rebuild the cache (`{hp.prepare_hint} --features`)"
                )
        elif not index.image_dir.is_dir():
            raise FileNotFoundError(f"image directory not found: {index.image_dir} (run `{hp.prepare_hint}`)")
        tokens, offsets = encode_captions(index.captions, gpt2_encoding(), hp.max_caption_tokens)
        source = ImageSource(index, image_size=hp.image_size, features=features)
        return _Split(index, source, CaptionPairs(index, tokens, offsets, source))

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return int(self.trainer.global_rank), int(self.trainer.world_size)

    def _loader(self, split: _Split, sampler: CaptionSampler) -> DataLoader:
        workers = self.hparams.num_workers
        return DataLoader(
            split.dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=CaptionCollate(split.source.key, split.source.shape),
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        split = self._split(self.hparams.train_split)
        rank, world = self._rank_world()
        epoch = int(getattr(self.trainer, "current_epoch", 0) or 0)
        skip = self._resume["batches"] if self._resume and self._resume["epoch"] == epoch else 0
        sampler = CaptionSampler(
            split.index,
            mode=self.hparams.captions_per_epoch,
            shuffle=True,
            seed=self.hparams.seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
            drop_tail=True,
            batch_size=self.hparams.batch_size,
            skip_batches=skip,
        )
        return self._loader(split, sampler)

    def val_dataloader(self) -> DataLoader:
        split = self._split(self.hparams.val_split)
        rank, world = self._rank_world()
        sampler = CaptionSampler(
            split.index, mode="all", shuffle=False, rank=rank, world_size=world, drop_tail=False
        )
        return self._loader(split, sampler)

    # --- resume -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Loader position for an exact mid-epoch resume (same world size and batch size assumed).

        "epoch_batches_consumed" is Lightning's own count of batches fetched in the current epoch: where
        Lightning resumes that epoch, so where the loader must resume too. "batches_consumed" (per-rank batches
        of the whole run, global_step × accumulation) equals it only within the first epoch.
        """
        trainer = self.trainer
        if trainer is None:
            return {}
        return {
            "batches_consumed": int(trainer.global_step * trainer.accumulate_grad_batches),
            "epoch": int(trainer.current_epoch),
            "epoch_batches_consumed": int(trainer.fit_loop.epoch_loop.batch_progress.current.ready),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        batches = state.get("epoch_batches_consumed", state.get("batches_consumed", 0))
        self._resume = {"epoch": int(state.get("epoch", 0)), "batches": int(batches)}

    # --- evaluation helpers -------------------------------------------------------------------------------
    def val_generation_items(self, n: int | None = None) -> list[dict]:
        """A fixed subset of `n` (default `val_gen_images`) captioned val images, for generation and the gallery:
        [{"image_id", "path", "pixel_values" (3, S, S) or "features" (N, D)}], in annotation-file order.

        The images are the first readable ones of a permutation drawn from `seed`, so the subset is the same on
        every call and every rank, and unreadable images are replaced rather than shrinking it.
        """
        split = self._split(self.hparams.val_split)
        n = self.hparams.val_gen_images if n is None else n
        captioned = np.flatnonzero(np.diff(split.index.offsets))
        chosen: dict[int, torch.Tensor] = {}
        for i in np.random.default_rng(self.hparams.seed).permutation(captioned).tolist():
            if len(chosen) == n:
                break
            image = split.source.load(i)
            if image is None:
                log.warning("val generation: skipping unreadable image %s", split.index.image_path(i))
                continue
            chosen[i] = image
        return [
            {
                "image_id": split.index.image_ids[i],
                "path": str(split.index.image_path(i)),
                split.source.key: image,
            }
            for i, image in sorted(chosen.items())
        ]

    def val_references(self) -> dict[int, list[str]]:
        """Raw reference captions of every captioned val image (the metrics tokenise them themselves)."""
        index = self._split(self.hparams.val_split).index
        refs = {image_id: index.image_captions(i) for i, image_id in enumerate(index.image_ids)}
        return {image_id: captions for image_id, captions in refs.items() if captions}

    def image_path(self, image_id: int) -> Path:
        """The file of an image id, looked up in the val split first, then in train."""
        for name in (self.hparams.val_split, self.hparams.train_split):
            index = self._split(name).index
            if image_id in index.position:
                return index.image_path(index.position[image_id])
        raise KeyError(
            f"image_id {image_id} is in neither {self.hparams.val_split} nor {self.hparams.train_split}"
        )
