"""(image, caption) pairs for the caption stage: caption tokens, the dataset, batching, the sampler, the DataModule.

Batches (see `CaptionCollate`): B images/captions, T the longest caption in the batch, S the image side,
N image tokens and D their width when serving cached CLIP features.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from captioner.data.caption_sampler import CaptionSampler
from captioner.data.coco_format import CaptionIndex, load_captions
from captioner.data.feature_cache import FeatureStore
from captioner.data.image_source import ImageSource
from captioner.errors import UserError
from captioner.tokenizer import EOT, gpt2_encoding

log = logging.getLogger(__name__)


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
        raise UserError(f"max_caption_tokens must be >= 1, got {max_tokens}")
    seqs = [_wrap(t, max_tokens) for t in enc.encode_ordinary_batch([normalize_caption(s) for s in texts])]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in seqs], out=offsets[1:])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


def reference_tokens(tokens: np.ndarray, token_offsets: np.ndarray, start: int, stop: int) -> list[list[int]]:
    """Captions start..stop as token ids, without the EOT that opens each but with the one that closes it (a
    cut caption has none): what a sampled caption, ended the same way, is compared with."""
    return [tokens[token_offsets[c] + 1 : token_offsets[c + 1]].tolist() for c in range(start, stop)]


class CaptionPairs(Dataset):
    """Item c = caption c of the split with its image. Which captions an epoch visits is the sampler's choice.

    Returns {key: image tensor, "input_ids": (L,), "labels": (L,), "image_id"}, with labels[t] the token after
    input_ids[t]; or, for an unreadable image, the sentinel {"skipped": file_name, "image_id"}. With
    `references`, items also carry "references": every caption of the image as token ids (`reference_tokens`),
    for a reward computed against them (self-critical training).
    """

    def __init__(
        self,
        index: CaptionIndex,
        tokens: np.ndarray,
        token_offsets: np.ndarray,
        source: ImageSource,
        references: bool = False,
    ):
        self.index, self.tokens, self.token_offsets, self.source = index, tokens, token_offsets, source
        self.references = references

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
        item = {self.source.key: image, "input_ids": seq[:-1], "labels": seq[1:], "image_id": image_id}
        if self.references:
            first, last = self.index.offsets[i], self.index.offsets[i + 1]
            item["references"] = reference_tokens(self.tokens, self.token_offsets, first, last)
        return item


@dataclass
class CaptionCollate:
    """Stack items into a batch, padding captions to the longest one; unreadable images are dropped and named.

    Batch: {key: (B, *image_shape) float32, "input_ids": (B, T) int64 padded with EOT, "labels": (B, T) int64
    padded with -100 (ignored by the loss; the EOT padding is never a target), "n_targets": how many labels are
    not -100, "image_ids": (B,) int64, "skipped": [file names]}, and with `references` the items' "references"
    (B lists of token-id lists). B can be 0 when every image of a batch was unreadable.
    """

    key: str
    image_shape: tuple[int, ...]
    references: bool = False

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
        batch = {
            self.key: images,  # (B, 3, S, S) or (B, N, D)
            "input_ids": input_ids,
            "labels": labels,
            "n_targets": int((labels != -100).sum()),  # counted on the CPU: the step reads no device
            "image_ids": torch.tensor([it["image_id"] for it in good], dtype=torch.int64),  # (B,)
            "skipped": [it["skipped"] for it in items if "skipped" in it],
        }
        if self.references:
            batch["references"] = [it["references"] for it in good]
        return batch


class GenerationImages(Dataset):
    """The fixed validation images whose captions are generated and scored: item k = {key: image tensor,
    "image_id", "path", "references": [raw captions]}. Built by `CocoCaptionDataModule.generation_images`."""

    def __init__(self, index: CaptionIndex, key: str, images: dict[int, torch.Tensor]):
        self.index, self.key, self.positions, self.images = index, key, sorted(images), images

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int) -> dict:
        i = self.positions[k]
        return {
            self.key: self.images[i],
            "image_id": self.index.image_ids[i],
            "path": str(self.index.image_path(i)),
            "references": self.index.image_captions(i),
        }


def collate_generation(items: list[dict]) -> dict:
    """Stack images; ids as a (B,) tensor; paths and references stay lists."""
    key = "features" if "features" in items[0] else "pixel_values"
    return {
        key: torch.stack([it[key] for it in items]),
        "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.int64),
        "paths": [it["path"] for it in items],
        "references": [it["references"] for it in items],
    }


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
    With `train_references` every training item also carries all its image's captions as token ids (the
    self-critical reward's references; `reference_corpus` gives them for the whole training split).
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
        train_references: bool = False,
    ):
        super().__init__()
        if captions_per_epoch not in ("all", "one"):
            raise UserError(f"data.captions_per_epoch must be 'all' or 'one', got {captions_per_epoch!r}")
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
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
                "train_references": train_references,
            }
        )
        self._splits: dict[str, _Split] = {}
        self._generation: dict[int, GenerationImages] = {}
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
            features = FeatureStore(hp.features_dir, name)
            missing = [i for i in index.image_ids if i not in features]
            if missing:
                raise UserError(
                    f"{features.meta_path}: no cached features for {len(missing)} image(s) of {index.path} "
                    f"(first: image_id {missing[0]}); rebuild the cache (`{hp.prepare_hint} --features`)"
                )
        elif not index.image_dir.is_dir():
            raise UserError(f"image directory not found: {index.image_dir} (run `{hp.prepare_hint}`)")
        tokens, offsets = encode_captions(index.captions, gpt2_encoding(), hp.max_caption_tokens)
        source = ImageSource(index, image_size=hp.image_size, features=features)
        references = hp.train_references and name == hp.train_split
        return _Split(index, source, CaptionPairs(index, tokens, offsets, source, references))

    def reference_corpus(self) -> tuple[list[list[list[int]]], str]:
        """Every training image's captions as token ids (`reference_tokens`), one list per image, and a digest of
        them (sha256 of the encoded split: names a cache of anything derived from the corpus)."""
        dataset = self._split(self.hparams.train_split).dataset
        offsets = dataset.index.offsets
        corpus = [
            reference_tokens(dataset.tokens, dataset.token_offsets, offsets[i], offsets[i + 1])
            for i in range(len(offsets) - 1)
        ]
        digest = hashlib.sha256(dataset.tokens.tobytes() + dataset.token_offsets.tobytes()).hexdigest()
        return corpus, digest[:16]

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
            collate_fn=CaptionCollate(split.source.key, split.source.shape, split.dataset.references),
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

    def val_dataloader(self) -> list[DataLoader]:
        """[val caption pairs (the loss), the generation images (captions to score)], each split across ranks."""
        split = self._split(self.hparams.val_split)
        rank, world = self._rank_world()
        sampler = CaptionSampler(
            split.index, mode="all", shuffle=False, rank=rank, world_size=world, drop_tail=False
        )
        images = self.generation_images()
        mine = Subset(images, range(rank, len(images), world))
        generation = DataLoader(mine, batch_size=self.hparams.batch_size, collate_fn=collate_generation)
        return [self._loader(split, sampler), generation]

    def generation_images(self, n: int | None = None) -> GenerationImages:
        """A fixed subset of `n` (default `val_gen_images`) captioned val images, in annotation-file order.

        The images are the first readable ones of a permutation drawn from `seed`, so the subset is the same on
        every call and every rank, and unreadable images are replaced rather than shrinking it. Decoded once and
        kept (a few hundred images).
        """
        split = self._split(self.hparams.val_split)
        n = self.hparams.val_gen_images if n is None else n
        if n not in self._generation:
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
            self._generation[n] = GenerationImages(split.index, split.source.key, chosen)
        return self._generation[n]

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
