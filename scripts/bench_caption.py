"""Benchmark (not a test): what the CLIP feature cache and the KV cache buy the captioner, and what its attention
maps cost, measured side by side.

    python scripts/bench_caption.py                     # CPU: small batches, few iterations (~6 min)
    python scripts/bench_caption.py --device cuda       # GPU: batch 32, bf16-mixed
    python scripts/bench_caption.py --sizes demo        # only the demo sizes

Sizes: "real" is CLIP ViT-B/32 (random weights, same shapes as openai/clip-vit-base-patch32) + GPT-2 124M with
cross-attention every 2 blocks; "demo" is the shapes stand-in CLIP's architecture + demo_caption.yaml's "demo" GPT.
Both read the same generated 640x480 JPEGs in a temporary COCO-layout directory, whose CLIP features are cached
with `build_feature_cache` first (not timed).

(a) vision: batches/s of the data module serving cached CLIP features vs decoding JPEGs + CLIP preprocessing +
    the CLIP forward, single process: the per-batch cost the cache removes (goal >= 10x).
(b) training: whole steps (loader + forward + backward + AdamW on the cross-attention and projection; CLIP and
    the LM frozen), images/s from the cache vs live, the loader with --num-workers as in training.
(c) decoding: beam search (3 beams, 20 new tokens) without a cache (build-nanogpt's loop: the whole sequence
    every step), with the static KV cache, and (CUDA) with the decode step replayed as a CUDA graph (goal >= 5x
    over no cache), from cached features. EOT is kept from winning, so decoding runs all 20 steps; ms/step is a
    run's time over 20 (prefill and beam bookkeeping included).
(d) the self-critical reward: CIDEr-D of one step's samples (32 images x 5 samples, 5 references each, COCO-like
    lengths over a 3,000-token vocabulary), eval/cider.py on token ids vs pycocoevalcap's CiderScorer on the same
    captions as words, with the same document frequencies (so the scores must agree: max |difference| printed).
(e) attention maps: captioning 32 images (greedy, and beam 3; 20 new tokens, from cached features) with
    `caption_batch` and with `caption_batch_with_attention` (the same decoding, then one teacher-forced pass with
    explicit attention weights), alternated run by run; the ratio is what the maps cost over decoding alone
    (CLIP excluded: with pixels both paths run it once, so the ratio would be smaller). Captions must agree.

Warm-up iterations are excluded; clocks are read after a CUDA synchronize. `gpu_check.py` imports from here.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from bench_pretrain import (
    PRECISIONS,
    autocast,
    clock,
    default_device,
    device_name,
    fill_defaults,
    set_cpu_threads,
    setup_backend,
    table,
)
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from captioner.data.captions import CocoCaptionDataModule
from captioner.data.feature_cache import FeatureStore, build_feature_cache
from captioner.io import atomic_path, save_json
from captioner.models.captioner import Captioner, caption_batch, caption_batch_with_attention
from captioner.models.gpt import GPT, GPTConfig
from captioner.models.vision import VisionEncoder
from captioner.optim import make_adamw
from captioner.shapes.clip import DEFAULT_CLIP_CONFIG as STANDIN_CLIP_CONFIG
from captioner.tokenizer import EOT

REPO = Path(__file__).resolve().parents[1]
SPLIT = "bench"

# openai/clip-vit-base-patch32's vision tower, as a CLIPVisionConfig (random weights: no download)
VIT_B32 = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=224,
    patch_size=32,
)


@dataclass
class CaptionSize:
    name: str
    lm: str  # GPTConfig.named name
    clip_config: dict
    cross_every: int

    @property
    def image_size(self) -> int:
        return self.clip_config["image_size"]


def caption_sizes() -> dict[str, CaptionSize]:
    """The real sizes, and the demo's: its experiment config's LM and its stand-in CLIP's architecture, read
    from where the demo takes them so the two never drift apart."""
    demo = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "experiment" / "demo_caption.yaml"))
    return {
        "real": CaptionSize("real", "gpt2_124m", VIT_B32, cross_every=2),
        "demo": CaptionSize(
            "demo", demo["model"]["lm"]["config"], STANDIN_CLIP_CONFIG, demo["model"]["cross_every"]
        ),
    }


def build_captioner(size: CaptionSize, device: torch.device, seed: int = 0) -> Captioner:
    """Random LM + random CLIP; trains cross-attention + projection only (CLIP frozen, as the cache requires)."""
    torch.manual_seed(seed)
    lm = GPT(GPTConfig.named(size.lm))
    vision = VisionEncoder(lm.config.n_embd, clip=None, clip_config=size.clip_config)
    model = Captioner(lm, vision, cross_every=size.cross_every, trainable=("xattn", "projection"))
    return model.to(device)


# ----------------------------------------------------------------------------------------------------------------
# data

# fmt: off
WORDS = (
    "a", "an", "the", "man", "woman", "dog", "cat", "person", "people", "group", "of", "two", "on", "in",
    "with", "at", "near", "next", "to", "street", "table", "plate", "food", "sitting", "standing",
    "holding", "riding", "playing", "white", "black", "red", "large", "small", "young", "old", "top",
    "front", "field", "water", "city", "bus", "train", "kitchen", "room", "bed", "grass", "snow", "beach",
    "pizza", "bike", "horse", "sign", "building", "tree",
)
# fmt: on


def random_photo(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
    """Smooth colour fields + shapes + sensor-like noise: compresses and decodes like a photo, unlike white noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.BICUBIC
    )
    draw = ImageDraw.Draw(coarse)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        box = (x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_coco_jpegs(root: str | Path, n_images: int, seed: int = 0) -> Path:
    """`n_images` 640x480 JPEGs (quality 90) in root/bench/ + root/annotations/captions_bench.json, one
    COCO-length caption (9-13 words) each."""
    root = Path(root)
    rng, words = np.random.default_rng(seed), random.Random(seed)
    images, annotations = [], []
    for image_id in range(1, n_images + 1):
        name = f"{image_id:012d}.jpg"
        with atomic_path(root / SPLIT / name) as tmp:
            random_photo(rng).save(tmp, format="JPEG", quality=90)
        images.append({"id": image_id, "file_name": name, "width": 640, "height": 480})
        caption = " ".join(words.choice(WORDS) for _ in range(words.randint(9, 13)))
        annotations.append({"id": image_id, "image_id": image_id, "caption": caption})
    save_json(root / "annotations" / f"captions_{SPLIT}.json", {"images": images, "annotations": annotations})
    return root


def datamodule(
    root: Path, size: CaptionSize, batch: int, features_dir=None, num_workers=0
) -> CocoCaptionDataModule:
    dm = CocoCaptionDataModule(
        str(root),
        train_split=SPLIT,
        val_split=SPLIT,
        batch_size=batch,
        num_workers=num_workers,
        image_size=size.image_size,
        max_caption_tokens=32,
        features_dir=None if features_dir is None else str(features_dir),
    )
    dm.setup("fit")
    return dm


def endless(dm: CocoCaptionDataModule) -> Iterator[dict]:
    """Training batches epoch after epoch from one DataLoader (its persistent workers start once)."""
    loader = dm.train_dataloader()
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------------------------
# measurements (each returns seconds per timed iteration)


def time_vision(model, batches, device, precision, *, live: bool, warmup: int, iters: int) -> list[float]:
    """Per batch: fetch it, move the image tensor to the device and, live, run CLIP on it."""
    seconds = []
    with torch.no_grad():
        for i in range(warmup + iters):
            start = clock(device)
            batch = next(batches)
            if live:
                pixels = batch["pixel_values"].to(device, non_blocking=True)  # (B, 3, S, S)
                with autocast(device, precision):
                    model.vision.encode(pixels)  # (B, N, D)
            else:
                batch["features"].to(device, non_blocking=True)  # (B, N, D)
            if i >= warmup:
                seconds.append(clock(device) - start)
    return seconds


def time_training(model, batches, device, precision, *, key: str, warmup: int, iters: int) -> list[float]:
    """Whole training steps on `key` ("pixel_values" or "features") batches, loader included."""
    model.train()
    optimizer = make_adamw(model, lr=1e-4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    seconds = []
    for i in range(warmup + iters):
        start = clock(device)
        batch = next(batches)
        images = batch[key].to(device, non_blocking=True)  # (B, 3, S, S) or (B, N, D)
        input_ids = batch["input_ids"].to(device, non_blocking=True)  # (B, T)
        labels = batch["labels"].to(device, non_blocking=True)  # (B, T)
        with autocast(device, precision):
            _, loss = model(input_ids, labels, **{key: images})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            seconds.append(clock(device) - start)
    return seconds


DECODERS = {  # generate options of each decoding path; "cuda graph" runs on CUDA only
    "no cache": dict(use_cache=False),  # build-nanogpt's loop: the whole sequence every step
    "kv cache": dict(use_cache=True),
    "cuda graph": dict(use_cache=True, cuda_graph=True),
}


def decoders(device: torch.device) -> list[str]:
    return [name for name in DECODERS if name != "cuda graph" or device.type == "cuda"]


def decode_to_the_end(model) -> None:
    """Eval mode, and a random LM that never stops early. With tied embeddings it predicts its own input token,
    so after the [EOT] prompt it would stop at once (0 tokens measured). Zeroing EOT's embedding row keeps its
    logit at 0, below the top candidates, so every beam decodes all max_new_tokens steps and every path does the
    same, full amount of work."""
    model.eval()
    with torch.no_grad():
        model.lm.transformer.wte.weight[EOT].zero_()


def time_attention(
    model, features, device, precision, *, method: str, repeats: int, max_new_tokens: int = 20
):
    """(e): captions of `features` (B, N, D) without and with attention maps, the two alternated `repeats` times
    after one untimed run of each. Returns {"seconds": {"captions", "+ maps"} medians, "same": how many
    captions agree, "tokens": mean map length}."""
    decode_to_the_end(model)
    generation = dict(method=method, num_beams=3, max_new_tokens=max_new_tokens)
    times = {"captions": [], "+ maps": []}
    with autocast(
        device, precision
    ):  # the caller's precision, as training's validation passes autocast=False
        for i in range(1 + repeats):
            start = clock(device)
            plain = caption_batch(model, features=features, autocast=False, **generation)
            middle = clock(device)
            mapped, maps = caption_batch_with_attention(
                model, features=features, autocast=False, **generation
            )
            if i:
                times["captions"].append(middle - start)
                times["+ maps"].append(clock(device) - middle)
    return {
        "seconds": {name: statistics.median(t) for name, t in times.items()},
        "same": sum(a == b for a, b in zip(plain, mapped, strict=True)),
        "tokens": statistics.mean(len(m.tokens) for m in maps),
    }


def time_decoding(
    model, features, device, precision, *, decoder: str, repeats: int, max_new_tokens: int = 20
):
    """Beam-3 captions of `features` (B, N, D) by one of DECODERS. Returns (seconds per run, captions of the last
    run). One untimed run first, with the same shapes (it captures the CUDA graph, where there is one)."""
    decode_to_the_end(model)
    generate = dict(method="beam", num_beams=3, max_new_tokens=max_new_tokens, **DECODERS[decoder])
    seconds = []
    with autocast(device, precision):
        model.generate(features=features, **generate)  # warm-up
        for _ in range(repeats):
            start = clock(device)
            captions = model.generate(features=features, **generate)
            seconds.append(clock(device) - start)
    return seconds, captions


# ----------------------------------------------------------------------------------------------------------------
# one size, end to end


@dataclass
class Settings:
    batch: int = 8
    images: int = 32
    warmup: int = 1
    iters: int = 3
    decode_batches: tuple[int, ...] = (2,)
    decode_repeats: int = 1
    attention_images: int = 32  # (e); 0 skips it
    num_workers: int = 0
    precision: str = "32-true"


def bench_size(size: CaptionSize, settings: Settings, device: torch.device, root: Path, work: Path) -> dict:
    """(a), (b), (c) for one size. `root` holds the JPEG COCO split; the cache goes to work/<size>."""
    s = settings
    model = build_captioner(size, device)
    features_dir = work / f"features_{size.name}"
    build_feature_cache(model.vision, root, SPLIT, features_dir, image_size=size.image_size, batch_size=32,
                        device=device)  # fmt: skip

    live_dm = datamodule(root, size, s.batch)
    cached_dm = datamodule(root, size, s.batch, features_dir)
    common = dict(warmup=s.warmup, iters=s.iters)
    vision = {
        "live": time_vision(model, endless(live_dm), device, s.precision, live=True, **common),
        "cached": time_vision(model, endless(cached_dm), device, s.precision, live=False, **common),
    }
    live_dm = datamodule(root, size, s.batch, num_workers=s.num_workers)
    cached_dm = datamodule(root, size, s.batch, features_dir, num_workers=s.num_workers)
    training = {
        "live": time_training(model, endless(live_dm), device, s.precision, key="pixel_values", **common),
        "cached": time_training(model, endless(cached_dm), device, s.precision, key="features", **common),
    }

    store = FeatureStore(features_dir, SPLIT)
    decoding = []
    for batch in s.decode_batches:
        rows = np.arange(batch) % len(store)  # more images than were cached: repeat them
        features = torch.from_numpy(store.array[rows]).float().to(device)  # (B, N, D)
        runs = {"batch": batch}
        for name in decoders(device):
            seconds, captions = time_decoding(
                model, features, device, s.precision, decoder=name, repeats=s.decode_repeats
            )
            runs[name] = {"seconds": statistics.median(seconds), "captions": captions}
        decoding.append(runs)

    attention = {}
    if s.attention_images:
        rows = np.arange(s.attention_images) % len(store)
        features = torch.from_numpy(store.array[rows]).float().to(device)  # (B, N, D)
        for method in ("greedy", "beam"):
            attention[method] = time_attention(
                model, features, device, s.precision, method=method, repeats=s.decode_repeats
            )
    return {
        "size": size,
        "vision": vision,
        "training": training,
        "decoding": decoding,
        "attention": attention,
    }


def ratios(result: dict) -> dict[str, float]:
    """The headline ratios of a `bench_size` result: mean live time over mean cached time for (a) and (b), and
    no-cache over kv-cache time for (c) at each decode batch size."""
    v, t = result["vision"], result["training"]
    out = {
        "vision_cache_x": statistics.mean(v["live"]) / statistics.mean(v["cached"]),
        "train_cache_x": statistics.mean(t["live"]) / statistics.mean(t["cached"]),
    }
    for d in result["decoding"]:
        out[f"decode_kv_x@{d['batch']}"] = d["no cache"]["seconds"] / d["kv cache"]["seconds"]
        if "cuda graph" in d:
            out[f"decode_graph_x@{d['batch']}"] = d["no cache"]["seconds"] / d["cuda graph"]["seconds"]
    for method, a in result["attention"].items():
        out[f"maps_x_{method}"] = a["seconds"]["+ maps"] / a["seconds"]["captions"]
    return out


def format_size(result: dict, settings: Settings) -> str:
    size, s = result["size"], settings
    v, t = result["vision"], result["training"]
    r = ratios(result)
    rows = []
    for name in ("cached", "live"):
        rows.append(
            [f"(a) vision, {name}", f"{len(v[name]) / sum(v[name]):,.2f} batches/s",
             f"{1000 * statistics.mean(v[name]):,.1f} ms/batch", ""]
        )  # fmt: skip
    rows[-1][-1] = f"{r['vision_cache_x']:,.1f}x (goal >= 10x)"
    for name in ("cached", "live"):
        rows.append(
            [f"(b) train step, {name}", f"{s.batch * len(t[name]) / sum(t[name]):,.1f} images/s",
             f"{1000 * statistics.mean(t[name]):,.1f} ms/step", ""]
        )  # fmt: skip
    rows[-1][-1] = f"{r['train_cache_x']:,.2f}x"
    notes = []
    for d in result["decoding"]:
        names = [name for name in DECODERS if name in d]
        for name in names:
            tokens = [len(c) for c in d[name]["captions"]]
            ratio = d["no cache"]["seconds"] / d[name]["seconds"]
            rows.append(
                [f"(c) beam-3 x{d['batch']} images, {name}", f"{sum(tokens) / d[name]['seconds']:,.1f} tokens/s",
                 f"{1000 * d[name]['seconds']:,.1f} ms/run ({1000 * d[name]['seconds'] / 20:.2f} ms/step)",
                 f"{statistics.mean(tokens):.1f} tokens/image, {ratio:,.2f}x vs no cache (goal >= 5x)"]
            )  # fmt: skip
        same = [
            sum(a == b for a, b in zip(d[name]["captions"], d["no cache"]["captions"])) for name in names[1:]
        ]
        notes.append(f"{'/'.join(map(str, same))} of {d['batch']}")
    for method, a in result["attention"].items():
        label = "greedy" if method == "greedy" else "beam-3"
        for name, seconds in a["seconds"].items():
            rows.append(
                [f"(e) {label} x{s.attention_images} images, {name}", f"{s.attention_images / seconds:,.1f} images/s",
                 f"{1000 * seconds:,.1f} ms/run", ""]
            )  # fmt: skip
        rows[-1][-1] = f"{r[f'maps_x_{method}']:,.2f}x, {a['tokens']:.0f}-token maps"
    clip = size.clip_config
    title = f"{size.name}: {size.lm} + CLIP {clip['hidden_size']}d x {clip['num_hidden_layers']}L @{size.image_size}px"
    same = ", ".join(
        f"{method} {a['same']}/{s.attention_images}" for method, a in result["attention"].items()
    )
    return (
        table([title, "throughput", "time", "ratio live/cached, no-cache/kv, maps/captions"], rows)
        + f"\n(c) captions identical to the no-cache path ({', '.join(names[1:])}): {', '.join(notes)}"
        + (f"\n(e) captions identical with maps: {same}" if same else "")
    )


def time_reward(repeats: int = 5, seed: int = 0) -> dict:
    """(d): seconds per step's CIDEr-D, ours and pycocoevalcap's (median of `repeats`), and their max |diff|."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    from captioner.eval.cider import CiderD

    rng = np.random.default_rng(seed)
    images, k = 32, 5
    refs = [[rng.integers(0, 3000, rng.integers(8, 16)).tolist() for _ in range(5)] for _ in range(images)]
    samples = [rng.integers(0, 3000, rng.integers(6, 16)).tolist() for _ in range(images * k)]
    groups = np.repeat(np.arange(images), k)
    # pycocoevalcap takes document frequencies from what it scores: give ours the same corpus
    ours = CiderD.from_corpus([refs[g] for g in groups])
    words = lambda ids: " ".join(map(str, ids))  # noqa: E731

    def theirs() -> np.ndarray:
        scorer = CiderScorer(n=4, sigma=6.0)
        for sample, g in zip(samples, groups, strict=True):
            scorer += (words(sample), [words(r) for r in refs[g]])
        return scorer.compute_score()[1]

    times = {"eval/cider.py (token ids)": [], "pycocoevalcap CiderScorer": []}
    for _ in range(repeats):
        start = time.perf_counter()
        a = ours(samples, refs, groups)
        times["eval/cider.py (token ids)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        b = theirs()
        times["pycocoevalcap CiderScorer"].append(time.perf_counter() - start)
    return {"captions": len(samples), "seconds": {n: statistics.median(t) for n, t in times.items()},
            "max_diff": float(np.abs(a - b).max())}  # fmt: skip


def format_reward(result: dict) -> str:
    seconds, n = result["seconds"], result["captions"]
    base = seconds["pycocoevalcap CiderScorer"]
    rows = [[name, f"{n / s:,.0f} captions/s", f"{1000 * s:,.1f} ms/step", f"{base / s:,.1f}x"]
            for name, s in seconds.items()]  # fmt: skip
    return (
        table(["(d) CIDEr-D reward, 32 images x 5 samples", "throughput", "time", "vs pycocoevalcap"], rows)
        + f"\n(d) max |ours - pycocoevalcap| = {result['max_diff']:.1e}"
    )


def run(sizes: list[str], settings: Settings, device: torch.device, seed: int = 0) -> list[dict]:
    """Write the JPEGs once, then bench every size on them."""
    setup_backend(device)
    known = caption_sizes()
    with tempfile.TemporaryDirectory(prefix="bench_caption_") as tmp:
        root = write_coco_jpegs(Path(tmp) / "coco", settings.images, seed=seed)
        return [bench_size(known[name], settings, device, root, Path(tmp)) for name in sizes]


# ----------------------------------------------------------------------------------------------------------------
# command line

GPU_DEFAULTS = dict(
    batch=32, images=256, warmup=3, iters=10, decode_batches=(32, 128), decode_repeats=3, num_workers=6,
    attention_images=32,
)  # fmt: skip
CPU_DEFAULTS = dict(
    batch=8, images=32, warmup=1, iters=3, decode_batches=(2, 32), decode_repeats=1, num_workers=0,
    attention_images=32,
)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device(), help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="the CPU sizes even on a GPU")
    p.add_argument("--sizes", default="real,demo", help="comma-separated: real, demo (default both)")
    p.add_argument("--batch", type=int, help="images per batch for (a) and (b) (GPU: 32, CPU: 8)")
    p.add_argument("--images", type=int, help="JPEGs to generate (GPU: 256, CPU: 32)")
    p.add_argument("--warmup", type=int, help="untimed iterations first (GPU: 3, CPU: 1)")
    p.add_argument("--iters", type=int, help="timed batches/steps for (a) and (b) (GPU: 10, CPU: 3)")
    p.add_argument(
        "--decode-batches", help="images per generate call, comma-separated (GPU: 32,128, CPU: 2,32)"
    )
    p.add_argument("--decode-repeats", type=int, help="timed generate calls, median (GPU: 3, CPU: 1)")
    p.add_argument(
        "--attention-images", type=int, help="images captioned with/without maps in (e); 0 skips (32)"
    )
    p.add_argument(
        "--num-workers", type=int, help="loader workers for (b) (GPU: 6 as configs/data/coco.yaml, CPU: 0)"
    )
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's choice with CUDA)"
    )
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16-mixed on CUDA, 32-true on CPU")
    args = fill_defaults(p.parse_args(argv), CPU_DEFAULTS, GPU_DEFAULTS)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if isinstance(args.decode_batches, str):
        args.decode_batches = tuple(int(b) for b in args.decode_batches.split(","))
    unknown = set(args.sizes) - {"real", "demo"}
    if unknown:
        p.error(f"--sizes: unknown {sorted(unknown)}; choose from real, demo")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    set_cpu_threads(device, args.threads)
    settings = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__})
    name = device_name(device)
    print(
        f"bench_caption | {name} | torch {torch.__version__} | {settings.precision} | batch {settings.batch} | "
        f"{settings.images} JPEGs 640x480 | {settings.iters} timed after {settings.warmup} warm-up | "
        f"(b) loader workers {settings.num_workers} | decode {'/'.join(map(str, settings.decode_batches))} images x 3 beams x 20 tokens | "
        f"(e) maps of {settings.attention_images} images\n"
    )
    for result in run(args.sizes, settings, device):
        print(format_size(result, settings) + "\n")
    print(format_reward(time_reward()))


if __name__ == "__main__":
    main()
