"""Benchmark (not a test): HellaSwag scoring packed vs right-padded vs one example at a time, side by side.

    python scripts/bench_hellaswag.py                         # CPU: a small GPT, 256 examples (about a minute)
    python scripts/bench_hellaswag.py --device cuda           # GPU: GPT-2 124M, all 10,042 examples, bf16
    python scripts/bench_hellaswag.py --file hellaswag_val.jsonl   # the real file, where you have it

Without the real file (offline), examples are generated with HellaSwag's length profile: a third ActivityNet-like
(context ~30 tokens, endings ~15) and two thirds WikiHow-like (context ~55, up to 200; endings ~27, up to 90),
made of common one-token words. That gives ~140 tokens of context + 4 endings per example, i.e. ~580 characters
at GPT-2's ~4.2 characters per token, close to the ~535 characters of the real validation split (evalscope lists
its prompts at 767.6 characters on average, 329-1,655, of which ~232 are a fixed instruction template). The
printed token statistics say what was measured. Weights are random: the counts check that every method scores
alike, not that the model is good.

Each method scores the same examples with the same model; the first run of each is reported as "cold" (it
includes tokenising and any allocator warm-up), the median of the next ones as "warm". Clocks are read after a
CUDA synchronize. `gpu_check.py` imports `compare` from here.
"""

from __future__ import annotations

import argparse
import random
import statistics

import torch
from bench_pretrain import (
    autocast,
    clock,
    default_device,
    default_precision,
    device_name,
    set_cpu_threads,
    table,
)

from captioner.data.hellaswag import load_examples, render_example
from captioner.eval.hellaswag import score_hellaswag
from captioner.models.gpt import GPT, GPTConfig
from captioner.tokenizer import gpt2_encoding

_WORDS = (
    "the man woman person he she they a an is are was to and of in on at with for his her their then now "
    "next while after before again up down out over into onto off back water ball car house dog cat hand "
    "hands table floor room kitchen street field wall door window chair bed paper box tree grass snow road "
    "takes puts holds shows walks runs jumps sits stands turns opens closes cuts pours mixes adds washes "
    "plays speaks talks looks smiles laughs moves starts stops uses makes gets gives see get make use can "
    "will may should you your it its this that these those some many more most all each other new good "
    "small large long short red blue green white black first last few several slowly quickly carefully"
)
WORDS = _WORDS.split()

# (share, context mean/sd/min/max, ending mean/sd/min/max) in tokens
PROFILE = {
    "activitynet": (1 / 3, (30, 10, 8, 80), (15, 5, 3, 40)),
    "wikihow": (2 / 3, (55, 25, 10, 200), (27, 12, 4, 90)),
}


def _length(rng: random.Random, mean: float, sd: float, lo: int, hi: int) -> int:
    return max(lo, min(hi, round(rng.gauss(mean, sd))))


def generated_examples(n: int, seed: int = 0) -> list[dict]:
    """n HellaSwag-format examples with HellaSwag's length profile (module docstring)."""
    rng = random.Random(seed)
    domains = list(PROFILE)
    weights = [PROFILE[d][0] for d in domains]
    examples = []
    for _ in range(n):
        _, ctx, end = PROFILE[rng.choices(domains, weights)[0]]
        words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
        examples.append(
            {
                "ctx": words(_length(rng, *ctx)).capitalize(),
                "endings": [words(_length(rng, *end)) + "." for _ in range(4)],
                "label": rng.randrange(4),
            }
        )
    return examples


def token_profile(examples: list[dict]) -> str:
    enc = gpt2_encoding()
    ctx, end, total = [], [], []
    for ex in examples:
        rows, starts = render_example(ex, enc)
        ctx.append(starts[0])
        end += [len(r) - s for r, s in zip(rows, starts)]
        total.append(starts[0] + sum(len(r) - s for r, s in zip(rows, starts)))
    return (
        f"{len(examples)} examples | context tokens mean {statistics.mean(ctx):.0f} (max {max(ctx)}) | "
        f"ending tokens mean {statistics.mean(end):.0f} (max {max(end)}) | "
        f"context + 4 endings mean {statistics.mean(total):.0f} tokens"
    )


METHODS = {  # name: score_hellaswag options
    "packed": dict(pack=True),
    "padded": dict(pack=False),
    "one at a time": dict(pack=False, batch_size=1),
}


def compare(
    model: GPT,
    examples: list[dict],
    device: torch.device,
    precision: str,
    *,
    batch_size: int,
    repeats: int = 2,
    methods: tuple[str, ...] = tuple(METHODS),
) -> dict[str, dict]:
    """{method: {"cold": s, "warm": s, "counts": {...}}} for each method on the same model and examples."""
    model = model.to(device).eval()
    enc = gpt2_encoding()
    out = {}
    for name in methods:
        options = {"batch_size": batch_size, **METHODS[name]}
        seconds = []
        for _ in range(1 + repeats):
            with autocast(device, precision):
                start = clock(device)
                counts = score_hellaswag(model, examples, device=device, enc=enc, **options)
                seconds.append(clock(device) - start)
        out[name] = {"cold": seconds[0], "warm": statistics.median(seconds[1:]), "counts": counts}
    return out


def format_results(results: dict[str, dict], n: int) -> str:
    base = results.get("packed")
    rows = []
    for name, r in results.items():
        ratio = f"{r['warm'] / base['warm']:.2f}x" if base else ""
        rows.append([name, f"{r['cold']:.2f}", f"{r['warm']:.2f}", f"{n / r['warm']:,.0f}", ratio,
                     f"{r['counts']['correct_norm']}/{r['counts']['n']}"])  # fmt: skip
    same = len({tuple(sorted(r["counts"].items())) for r in results.values()}) == 1
    return (
        table(["method", "cold s", "warm s", "examples/s", "time / packed", "acc_norm count"], rows)
        + f"\ncounts identical across methods: {'yes' if same else 'NO (bf16 rounding can flip a near tie)'}"
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device())
    p.add_argument("--file", help="a HellaSwag jsonl (default: generated examples with its length profile)")
    p.add_argument("--examples", type=int, help="how many (GPU: 10042, CPU: 256)")
    p.add_argument("--model", help="GPT config name (GPU: gpt2_124m; CPU: a 4-layer 128-wide GPT, block 512)")
    p.add_argument("--batch-size", type=int, help="examples per forward (GPU: 256, CPU: 16)")
    p.add_argument("--repeats", type=int, default=2, help="warm runs after the cold one (median reported)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated from: {', '.join(METHODS)}")
    p.add_argument("--precision", choices=("32-true", "bf16-mixed"))
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 on CPU)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    set_cpu_threads(device, args.threads)
    gpu = device.type == "cuda"
    n = args.examples or (10042 if gpu else 256)
    torch.manual_seed(0)
    if args.model or gpu:
        config = GPTConfig.named(args.model or "gpt2_124m")
    else:
        config = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=512)
    examples = load_examples(args.file, limit=n) if args.file else generated_examples(n)
    precision = args.precision or default_precision(device)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    batch_size = args.batch_size or (256 if gpu else 16)
    print(
        f"bench_hellaswag | {device_name(device)} | torch {torch.__version__} | {precision} | GPT "
        f"{config.n_layer}x{config.n_embd}, block {config.block_size} | batch {batch_size} examples\n"
        f"{token_profile(examples)}\n"
    )
    results = compare(
        GPT(config), examples, device, precision, batch_size=batch_size, repeats=args.repeats, methods=methods
    )
    print(format_results(results, len(examples)))


if __name__ == "__main__":
    main()
