"""The shapes world written out in the project's production formats, so the whole demo runs offline:

    out_dir/text/shapes_val_000000.npy, shapes_train_000001.npy ...  uint16 token shards (EOT-prefixed docs)
    out_dir/hellaswag/shapes_val.jsonl                               HellaSwag format (+ the scene per row)
    out_dir/images/{train,val}/{image_id:08d}.png                    rendered scenes
    out_dir/images/annotations/captions_{train,val}.json             COCO captions format
    out_dir/images/annotations/scenes_{train,val}.json               {image_id: scene dict}
    out_dir/vocab_ids.json                                           the GPT-2 token ids all of it uses

Everything is a pure function of the seed: each output draws from its own `random.Random` stream, so a file
regenerated after being deleted is byte-identical to the original, and existing files are never rewritten.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from captioner.data.captions import encode_captions
from captioner.data.hellaswag import render_example
from captioner.data.shards import load_shard, shard_path, write_shard
from captioner.errors import UserError
from captioner.io import atomic_path, save_json, save_text
from captioner.shapes.images import render_scene
from captioner.shapes.text import captions_for, document, hellaswag_rows
from captioner.shapes.world import sample_scene
from captioner.tokenizer import EOT, gpt2_encoding

PREFIX = "shapes"  # token shard names: shapes_{val,train}_NNNNNN.npy
# Recorded in the manifest: bump it whenever the same seed would write different bytes, so an old world on
# disk is refused rather than topped up with files from the new one.
FORMAT_VERSION = 1


def _rng(seed: int, stream: str) -> random.Random:
    """An independent random stream per output, so each file depends only on (seed, stream)."""
    return random.Random(f"shapes:{seed}:{stream}")


def corpus_tokens(rng: random.Random, n_tokens: int, batch: int = 4096) -> np.ndarray:
    """Exactly `n_tokens` GPT-2 tokens of EOT-prefixed documents about random scenes (the last one cut)."""
    enc = gpt2_encoding()
    eot = enc.decode([EOT])
    chunks, total = [], 0
    while total < n_tokens:
        # One encode call per batch: tiktoken splits at the special token first and encodes the pieces
        # between independently, so this equals per-document encoding at a fraction of the call overhead.
        text = "".join(eot + document(sample_scene(rng), rng) for _ in range(batch))
        chunks.append(np.array(enc.encode(text, allowed_special={eot}), dtype=np.uint16))
        total += len(chunks[-1])
    return np.concatenate(chunks)[:n_tokens]


def write_text_shards(
    out_dir: str | Path, *, seed: int, split: str, n_tokens: int, shard_size: int | None = None
) -> list[Path]:
    """Token shards for `split`: val is one shard, index 0; train is shards 1.. of `shard_size` tokens."""
    if split == "val":
        paths = [shard_path(out_dir, PREFIX, "val", 0)]
        shard_size = n_tokens
    else:
        shard_size = shard_size or n_tokens
        paths = [shard_path(out_dir, PREFIX, split, k + 1) for k in range(math.ceil(n_tokens / shard_size))]
    if all(p.exists() for p in paths):
        return paths
    tokens = corpus_tokens(_rng(seed, f"text/{split}"), n_tokens)
    for k, path in enumerate(paths):
        if not path.exists():
            write_shard(path, tokens[k * shard_size : (k + 1) * shard_size])
    return paths


def write_hellaswag(path: str | Path, *, seed: int, n: int) -> Path:
    """`n` HellaSwag-format questions about random scenes, one json row per line (kept if `path` exists)."""
    path = Path(path)
    if not path.exists():
        rows = hellaswag_rows(_rng(seed, "hellaswag"), n)
        save_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_images(
    root: str | Path,
    split: str,
    *,
    seed: int,
    first_id: int,
    n: int,
    image_size: int,
    captions_per_image: int,
) -> tuple[Path, Path]:
    """Render `n` scenes into root/split/ and write COCO captions + scenes json; ids first_id .. first_id+n-1.

    Annotation ids are image_id * 100 + k, unique across splits as long as image ids are.
    """
    root = Path(root)
    rng = _rng(seed, f"images/{split}")
    scenes, captions = {}, {}
    for image_id in range(first_id, first_id + n):
        scenes[image_id] = sample_scene(rng)
        captions[image_id] = captions_for(scenes[image_id], rng, captions_per_image)
    for image_id, scene in scenes.items():
        dest = root / split / f"{image_id:08d}.png"
        if not dest.exists():
            with atomic_path(dest) as tmp:
                render_scene(scene, image_size).save(tmp, format="PNG")
    captions_file = root / "annotations" / f"captions_{split}.json"
    if not captions_file.exists():
        coco = {
            "info": {
                "description": f"shapes world, {split} split",
                "version": str(FORMAT_VERSION),
                "seed": seed,
            },
            "licenses": [],
            "images": [
                {"id": i, "file_name": f"{i:08d}.png", "width": image_size, "height": image_size}
                for i in scenes
            ],
            "annotations": [
                {"id": (i - 1) * captions_per_image + k + 1, "image_id": i, "caption": c}
                for i, caps in captions.items()
                for k, c in enumerate(caps)
            ],
        }
        save_json(captions_file, coco)
    scenes_file = root / "annotations" / f"scenes_{split}.json"
    if not scenes_file.exists():
        save_json(scenes_file, {str(i): s.to_dict() for i, s in scenes.items()})
    return captions_file, scenes_file


def write_vocab_ids(path: str | Path, *, text: Path, hellaswag: Path, captions: list[Path]) -> Path:
    """The sorted GPT-2 token ids that the world's text shards, HellaSwag rows (as the scorer tokenises them)
    and captions (as the caption data tokenises them) use, <|endoftext|> included, as a JSON list (kept if
    `path` exists). An LM of this world takes it as `CompactVocabConfig.vocab_ids` and then spends nothing on the ~50K
    ids it never sees: the demo LM's output layer shrinks from 50,304 rows to 65."""
    path = Path(path)
    if path.exists():
        return path
    enc = gpt2_encoding()
    used = np.zeros(2**16, dtype=bool)
    for shard in sorted(text.glob(f"{PREFIX}_*.npy")):
        used[np.unique(load_shard(shard))] = True
    for line in hellaswag.read_text().splitlines():
        rows, _ = render_example(json.loads(line), enc)
        used[[t for row in rows for t in row]] = True
    for captions_file in captions:
        texts = [a["caption"] for a in json.loads(captions_file.read_text())["annotations"]]
        tokens, _ = encode_captions(texts, enc, max_tokens=10**6)
        used[tokens] = True
    used[EOT] = True
    save_json(path, np.flatnonzero(used).tolist())
    return path


def prepare_shapes(
    out_dir: str | Path,
    *,
    seed: int = 0,
    train_tokens: int = 3_000_000,
    val_tokens: int = 100_000,
    n_train_images: int = 4000,
    n_val_images: int = 200,
    n_hellaswag: int = 500,
    image_size: int = 64,
    captions_per_image: int = 5,
    shard_size: int | None = None,
) -> dict[str, Path]:
    """Generate the whole shapes world under `out_dir` (layout in the module docstring); returns its paths.

    Idempotent: outputs that exist are kept, missing ones are regenerated identically. `out_dir/manifest.json`
    records the arguments; asking for different ones in the same directory is an error rather than a silent
    mix of two worlds.
    """
    params = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "n_train_images": n_train_images,
        "n_val_images": n_val_images,
        "n_hellaswag": n_hellaswag,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "shard_size": shard_size,
    }
    for key, value in params.items():
        if key != "shard_size" and (not isinstance(value, int) or value < (0 if key == "seed" else 1)):
            raise UserError(f"prepare_shapes: {key} must be a positive integer, got {value!r}")
    if shard_size is not None and (not isinstance(shard_size, int) or shard_size < 1):
        raise UserError(f"prepare_shapes: shard_size must be a positive integer or None, got {shard_size!r}")
    if image_size < 16:
        raise UserError(f"prepare_shapes: image_size {image_size} is too small to draw shapes (min 16)")

    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        old = json.loads(manifest.read_text())
        if old != params:
            changed = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
            raise UserError(
                f"{manifest}: this directory holds a shapes world made with other arguments (old, new): {changed}; "
                "use another out_dir or delete this one"
            )
    else:
        save_json(manifest, params, indent=2)

    text = out_dir / "text"
    write_text_shards(text, seed=seed, split="val", n_tokens=val_tokens)
    write_text_shards(text, seed=seed, split="train", n_tokens=train_tokens, shard_size=shard_size)
    hellaswag = write_hellaswag(out_dir / "hellaswag" / "shapes_val.jsonl", seed=seed, n=n_hellaswag)
    images = out_dir / "images"
    common = {"seed": seed, "image_size": image_size, "captions_per_image": captions_per_image}
    captions_train, scenes_train = write_images(images, "train", first_id=1, n=n_train_images, **common)
    captions_val, scenes_val = write_images(
        images, "val", first_id=n_train_images + 1, n=n_val_images, **common
    )
    vocab_ids = write_vocab_ids(
        out_dir / "vocab_ids.json", text=text, hellaswag=hellaswag, captions=[captions_train, captions_val]
    )
    return {
        "text": text,
        "vocab_ids": vocab_ids,
        "hellaswag": hellaswag,
        "images": images,
        "captions_train": captions_train,
        "captions_val": captions_val,
        "scenes_train": scenes_train,
        "scenes_val": scenes_val,
    }
