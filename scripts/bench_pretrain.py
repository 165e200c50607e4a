"""Benchmark (not a test): stage-1 training throughput through Lightning vs a plain PyTorch loop, and HellaSwag
scoring batched vs one example at a time. Both sides of each ratio run in this process on the same config.

    python scripts/bench_pretrain.py                      # CPU: demo GPT, small sizes (about a minute)
    python scripts/bench_pretrain.py --device cuda        # GPU: GPT-2 124M, 8 x 1024, bf16-mixed
    python scripts/bench_pretrain.py --device cuda --compile --micro-batch 16

Training: the same GPT config, initial weights (seed), token-shard data stream (`TokenShardDataModule`),
optimizer recipe (`make_adamw` + warmup-cosine from `OptimConfig`), micro-batch, gradient accumulation and grad
clip 1.0 on both paths. Throughput is measured over the optimizer steps after the warm-up ones, with the clock
read after a CUDA synchronize at the end of each optimizer step. Random tokens: the data's content does not
change the speed, and the two paths' final losses should agree (a check that they did the same work).

`bench_caption.py` and `gpu_check.py` import the helpers and `compare_training` from here. On a CPU the
benchmarks run one thread by default (see `set_cpu_threads`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch

from captioner.data.token_shards import TokenShardDataModule, shard_path, write_shard
from captioner.models.gpt import GPT, GPTConfig
from captioner.optim import make_adamw, warmup_cosine_schedule
from captioner.tokenizer import N_VOCAB
from captioner.training.base import OptimConfig
from captioner.training.callbacks.throughput import peak_flops_for
from captioner.training.pretrain import PretrainModule

PRECISIONS = ("32-true", "bf16-mixed")

# ----------------------------------------------------------------------------------------------------------------
# helpers shared with bench_caption.py and gpu_check.py


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_precision(device: torch.device) -> str:
    return "bf16-mixed" if device.type == "cuda" else "32-true"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's thread count and load (other processes on a shared CPU skew its timings)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"cpu ({torch.get_num_threads()} threads{load}, {os.cpu_count()} cores)"


def set_cpu_threads(device: torch.device, threads: int | None) -> None:
    """Benchmarks on a CPU default to 1 thread: when another process shares the cores, an OpenMP team of 2 waits
    at every barrier for its descheduled thread, and step times swing by 5x; one thread keeps them steady."""
    if threads is None and device.type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)


def autocast(device: torch.device, precision: str):
    """The autocast Lightning's `precision` sets up, for the plain loops: bf16 autocast, or nothing for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def clock(device: torch.device) -> float:
    """Wall time after the device has finished its queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def setup_backend(device: torch.device) -> None:
    """TF32 for the fp32 matmuls that remain under autocast, as build-nanogpt; the same for every path here."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")


def quiet_lightning() -> None:
    """Keep Lightning's banners and the few-workers / no-logger warnings out of the benchmark output."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*TensorCore.*|.*Tensor Cores.*")
    warnings.filterwarnings("ignore", message=".*LitLogger.*|.*litlogger.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # inside Lightning


def table(headers: list[str], rows: list[list], left: int = 1) -> str:
    """A plain-text table: the first `left` columns left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(parts).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def step_durations(step_ends: list[float], warmup: int) -> list[float]:
    """Seconds of each optimizer step after the first `warmup`; step_ends[i] is the clock at the end of step i."""
    if warmup < 1 or len(step_ends) <= warmup:
        raise ValueError(f"need warmup >= 1 and more than {warmup} steps, got {len(step_ends)}")
    return [b - a for a, b in zip(step_ends[warmup - 1 : -1], step_ends[warmup:])]


# ----------------------------------------------------------------------------------------------------------------
# training throughput


@dataclass
class TrainSetup:
    """Everything both training paths share."""

    model: str = "demo"  # GPTConfig.named name
    micro_batch: int = 4
    seq_len: int = 128
    accum: int = 2
    steps: int = 10  # timed optimizer steps
    warmup: int = 3  # optimizer steps run first and not timed (allocator, autotuning, compilation)
    precision: str = "32-true"
    compile: bool = False
    seed: int = 1337

    @property
    def total_steps(self) -> int:
        return self.steps + self.warmup

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_len * self.accum

    def optim(self) -> dict:
        # warmup then cosine over the run, so the schedule's code runs as in a real fit
        return asdict(OptimConfig(warmup_steps=max(1, self.total_steps // 4), max_steps=self.total_steps))

    def gpt_config(self) -> GPTConfig:
        config = GPTConfig.named(self.model)
        if self.seq_len > config.block_size:
            raise ValueError(
                f"--seq-len {self.seq_len} exceeds model {self.model}'s block_size {config.block_size}"
            )
        return config


@dataclass
class TrainResult:
    """Timed optimizer steps of one path (one or several runs pooled) and what they imply."""

    path: str
    step_seconds: list[float]
    tokens_per_step: int
    final_loss: float
    flops_per_token: float
    peak_flops: float | None  # bf16 dense peak of the GPU, None on CPU or an unlisted GPU

    @property
    def tokens_per_sec(self) -> float:
        """Wall-clock throughput: all timed tokens over all timed seconds."""
        return self.tokens_per_step * len(self.step_seconds) / sum(self.step_seconds)

    @property
    def tokens_per_sec_median(self) -> float:
        """From the median step: robust to bursts of other work on a shared machine."""
        return self.tokens_per_step / statistics.median(self.step_seconds)

    @property
    def mfu(self) -> float | None:
        return self.tokens_per_sec * self.flops_per_token / self.peak_flops if self.peak_flops else None


def write_token_shards(data_dir: str | Path, setup: TrainSetup) -> Path:
    """Random GPT-2 token ids as one train and one val shard, enough for every micro-batch of a run."""
    rng = np.random.default_rng(setup.seed)
    n_train = setup.total_steps * setup.accum * setup.micro_batch * setup.seq_len + 1
    write_shard(shard_path(data_dir, "bench", "train", 1), rng.integers(0, N_VOCAB, n_train))
    write_shard(shard_path(data_dir, "bench", "val", 0), rng.integers(0, N_VOCAB, setup.seq_len + 1))
    return Path(data_dir)


def _datamodule(data_dir: Path, setup: TrainSetup) -> TokenShardDataModule:
    return TokenShardDataModule(
        data_dir,
        seq_len=setup.seq_len,
        micro_batch_size=setup.micro_batch,
        total_batch_tokens=setup.tokens_per_step,
        val_tokens=setup.seq_len,
        num_workers=0,
        seed=setup.seed,
        prepare_hint="bench_pretrain.write_token_shards",
    )


def _result(path, setup, step_ends, final_loss, device, flops_per_token) -> TrainResult:
    return TrainResult(
        path=path,
        step_seconds=step_durations(step_ends, setup.warmup),
        tokens_per_step=setup.tokens_per_step,
        final_loss=final_loss,
        flops_per_token=flops_per_token,
        peak_flops=peak_flops_for(torch.cuda.get_device_name(device)) if device.type == "cuda" else None,
    )


class StepTimer(L.Callback):
    """Reads the clock at the end of every optimizer step (the batch end where global_step has moved on)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.times.append(clock(pl_module.device))


def run_lightning(data_dir: Path, setup: TrainSetup, device: torch.device) -> TrainResult:
    """`lightning.Trainer.fit` of `PretrainModule` for setup.total_steps optimizer steps."""
    quiet_lightning()
    torch.manual_seed(setup.seed)
    module = PretrainModule(model=setup.model, optim=setup.optim(), compile=setup.compile)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=setup.precision,
        max_steps=setup.total_steps,
        max_epochs=-1,
        accumulate_grad_batches=setup.accum,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=str(data_dir),
    )
    trainer.fit(module, datamodule=_datamodule(data_dir, setup))
    final_loss = float(trainer.callback_metrics["train/loss"])
    return _result(
        "lightning", setup, timer.times, final_loss, device, module.model.flops_per_token(setup.seq_len)
    )


def run_plain(data_dir: Path, setup: TrainSetup, device: torch.device) -> TrainResult:
    """build-nanogpt's loop: accumulate, clip 1.0, AdamW step, lr schedule step; same data stream as Lightning."""
    torch.manual_seed(setup.seed)
    model = GPT(GPTConfig.named(setup.model)).to(device)
    model.train()
    forward = torch.compile(model) if setup.compile else model
    c = OptimConfig(**setup.optim())
    optimizer = make_adamw(model, lr=c.lr, weight_decay=c.weight_decay, betas=c.betas, eps=c.eps)
    scheduler = warmup_cosine_schedule(
        optimizer, warmup_steps=c.warmup_steps, max_steps=c.max_steps, min_lr_ratio=c.min_lr_ratio
    )["scheduler"]
    batches = iter(_datamodule(data_dir, setup).train_dataloader())
    step_times = []
    for _ in range(setup.total_steps):
        loss_sum = torch.zeros((), device=device)
        for _ in range(setup.accum):
            x, y = next(batches)  # (B, T) int64 each
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, setup.precision):
                _, loss = forward(x, y)
            loss_sum += loss.detach()
            (loss / setup.accum).backward()  # mean over the accumulated micro-batches, as Lightning scales it
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(clock(device))
    final_loss = float(loss_sum) / setup.accum
    return _result("plain", setup, step_times, final_loss, device, model.flops_per_token(setup.seq_len))


def compare_training(setup: TrainSetup, device: torch.device, repeats: int = 1) -> dict[str, TrainResult]:
    """Both paths, `repeats` runs each in ABBA order (plain, lightning, lightning, plain, ...) so that slow drift
    of a shared machine affects both alike; each path's timed steps are pooled over its runs."""
    setup_backend(device)
    runs: dict[str, list[TrainResult]] = {"plain": [], "lightning": []}
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        data_dir = write_token_shards(tmp, setup)
        for r in range(repeats):
            for path in ("plain", "lightning") if r % 2 == 0 else ("lightning", "plain"):
                run = run_plain if path == "plain" else run_lightning
                runs[path].append(run(data_dir, setup, device))
    return {
        path: replace(results[-1], step_seconds=[s for r in results for s in r.step_seconds])
        for path, results in runs.items()
    }


def format_training(results: dict[str, TrainResult]) -> str:
    rows = []
    for r in results.values():
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        rows.append(
            [r.path, f"{r.tokens_per_sec:,.0f}", f"{r.tokens_per_sec_median:,.0f}",
             f"{1000 * r.tokens_per_step / r.tokens_per_sec:.1f}", mfu, f"{r.final_loss:.4f}"]
        )  # fmt: skip
    plain, lightning = results["plain"], results["lightning"]
    return (
        table(["training", "tokens/s", "tokens/s (median step)", "ms/step", "MFU", "final loss"], rows)
        + f"\nratio lightning/plain: {lightning.tokens_per_sec / plain.tokens_per_sec:.3f} wall, "
        f"{lightning.tokens_per_sec_median / plain.tokens_per_sec_median:.3f} median step  (goal >= 0.95)"
    )


# ----------------------------------------------------------------------------------------------------------------
# HellaSwag scoring


def shapes_hellaswag(n: int, seed: int = 0) -> list[dict]:
    """`n` shapes-world HellaSwag examples, written as the jsonl the evaluator reads and loaded back."""
    from captioner.data.hellaswag import load_examples
    from captioner.prepare.shapes import write_hellaswag

    with tempfile.TemporaryDirectory(prefix="bench_hellaswag_") as tmp:
        return load_examples(write_hellaswag(Path(tmp) / "shapes_val.jsonl", seed=seed, n=n))


def compare_hellaswag(
    model: torch.nn.Module,
    examples: list[dict],
    device: torch.device,
    precision: str,
    batch_sizes: tuple[int, ...] = (16, 1),
) -> list[dict]:
    """Examples/s of `score_hellaswag` at each batch size (examples per forward) on the same model and examples.
    A short run on the first examples comes first and is not timed."""
    from captioner.eval.hellaswag import score_hellaswag
    from captioner.tokenizer import gpt2_encoding

    enc = gpt2_encoding()
    model = model.to(device)
    out = []
    for bs in batch_sizes:
        with autocast(device, precision):
            score_hellaswag(model, examples[: 2 * bs], batch_size=bs, device=device, enc=enc)  # warm-up
            start = clock(device)
            counts = score_hellaswag(model, examples, batch_size=bs, device=device, enc=enc)
            elapsed = clock(device) - start
        out.append({"batch_size": bs, "examples_per_sec": len(examples) / elapsed, "counts": counts})
    return out


def format_hellaswag(results: list[dict], precision: str = "32-true") -> str:
    rows = [
        [f"batch_size={r['batch_size']}", f"{r['examples_per_sec']:,.1f}",
         f"{r['counts']['correct_norm']}/{r['counts']['n']}"]
        for r in results
    ]  # fmt: skip
    ratio = results[0]["examples_per_sec"] / results[-1]["examples_per_sec"]
    same = all(r["counts"] == results[0]["counts"] for r in results)
    # fp32 scores are identical with and without padding; bf16 rounding may flip a near tie
    verdict = "yes" if same else "no (bf16 rounding)" if precision == "bf16-mixed" else "NO"
    return (
        table(["hellaswag", "examples/s", "acc_norm count"], rows)
        + f"\nratio batched/one-at-a-time: {ratio:.2f}x   counts identical: {verdict}"
    )


# ----------------------------------------------------------------------------------------------------------------
# command line

GPU_DEFAULTS = dict(
    model="gpt2_124m", micro_batch=8, seq_len=1024, steps=20, warmup=5, repeats=1, hellaswag=256
)
CPU_DEFAULTS = dict(model="demo", micro_batch=4, seq_len=128, steps=8, warmup=2, repeats=2, hellaswag=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--device", default=default_device(), help="cuda (default when available) or cpu")
    p.add_argument(
        "--quick", action="store_true", help="the CPU sizes even on a GPU (about a minute on 2 cores)"
    )
    p.add_argument(
        "--model", choices=["tiny", "demo", "gpt2_124m"], help="GPT config (GPU: gpt2_124m, CPU: demo)"
    )
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16-mixed on CUDA, 32-true on CPU")
    p.add_argument("--micro-batch", type=int, help="sequences per micro-batch (GPU: 8, CPU: 4)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (GPU: 1024, CPU: 128)")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step (default 2)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per run (GPU: 20, CPU: 8)")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps first, >= 1 (GPU: 5, CPU: 2)")
    p.add_argument("--repeats", type=int, help="runs per path in ABBA order, steps pooled (GPU: 1, CPU: 2)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's choice with CUDA)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward on both paths")
    p.add_argument(
        "--hellaswag", type=int, help="shapes HellaSwag examples to score (GPU: 256, CPU: 64; 0 skips)"
    )
    return fill_defaults(p.parse_args(argv), CPU_DEFAULTS, GPU_DEFAULTS)


def fill_defaults(args: argparse.Namespace, cpu: dict, gpu: dict) -> argparse.Namespace:
    """Unset options take the CPU (or --quick) or GPU defaults of the device, precision included."""
    device = torch.device(args.device)
    for key, value in (cpu if args.quick or device.type != "cuda" else gpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.precision = args.precision or default_precision(device)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    set_cpu_threads(device, args.threads)
    setup = TrainSetup(
        model=args.model,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        accum=args.accum,
        steps=args.steps,
        warmup=args.warmup,
        precision=args.precision,
        compile=args.compile,
    )
    config = setup.gpt_config()
    with torch.device("meta"):  # shapes only: counting parameters allocates nothing
        n_params = GPT(config).num_params()
    name = device_name(device)
    print(
        f"bench_pretrain | {name} | torch {torch.__version__} | model {setup.model} "
        f"({config.n_layer}L {config.n_head}H {config.n_embd}C, {n_params / 1e6:.1f}M params) | {setup.precision}"
        f"{' | compiled' if setup.compile else ''}\n"
        f"micro-batch {setup.micro_batch} x seq {setup.seq_len} x accum {setup.accum} = "
        f"{setup.tokens_per_step:,} tokens/step | {setup.steps} timed steps after {setup.warmup} warm-up | "
        f"repeats {args.repeats}\n"
    )
    print(format_training(compare_training(setup, device, repeats=args.repeats)))
    if args.hellaswag:
        torch.manual_seed(setup.seed)
        model = GPT(config)
        examples = shapes_hellaswag(args.hellaswag)
        print(
            f"\nHellaSwag: {len(examples)} shapes-world examples, same {setup.model} model (random weights)"
        )
        print(format_hellaswag(compare_hellaswag(model, examples, device, setup.precision), setup.precision))


if __name__ == "__main__":
    main()
