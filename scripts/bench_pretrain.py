"""Benchmark (not a test): stage-1 training throughput through Lightning vs a plain PyTorch loop (HellaSwag scoring:
`bench_hellaswag.py`). Both sides of each ratio run in this process on the same config.

    python scripts/bench_pretrain.py                      # CPU: demo GPT, small sizes (about a minute)
    python scripts/bench_pretrain.py --device cuda        # GPU: GPT-2 124M, 8 x 1024, bf16-mixed
    python scripts/bench_pretrain.py --device cuda --compile --micro-batch 16
    python scripts/bench_pretrain.py --bng build-nanogpt/train_gpt2.py   # its own loop vs captioner-train
    python scripts/bench_pretrain.py --bng build-nanogpt/train_gpt2.py --device cuda --compile

Training: the same GPT config, initial weights (seed), token-shard data stream (`TokenShardDataModule`),
optimizer recipe (`make_adamw` + warmup-cosine from `OptimConfig`), micro-batch, gradient accumulation and grad
clip 1.0 on both paths. Throughput is measured over the optimizer steps after the warm-up ones, with the clock
read after a CUDA synchronize at the end of each optimizer step. Random tokens: the data's content does not
change the speed, and the two paths' final losses should agree (a check that they did the same work).

`--bng PATH/train_gpt2.py` compares instead build-nanogpt's own GPT and training step, executed from that file
(see `BuildNanoGPT`), with `captioner-train experiment=demo_pretrain` at the same shapes, seed, initial weights,
token windows and lr schedule (`train(cfg)` with a step clock added to its callbacks; `--override KEY=VALUE`
passes more overrides, e.g. logger=default). Runs alternate ABBA; on a CPU each side is also measured in tokens per
second of process CPU time, which other processes on a shared machine do not inflate. `--compile` compiles our side
only: build-nanogpt is measured as it ships (compile off).

`bench_caption.py` and `gpu_check.py` import the helpers and `compare_training` from here. On a CPU the
benchmarks run one thread by default (see `set_cpu_threads`).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import io
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch

from captioner.data.shards import shard_path, write_shard
from captioner.data.token_shards import TokenShardDataModule
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
    cpu_seconds: list[float] | None = None  # process CPU time of the same steps (all threads), when recorded

    @property
    def tokens_per_sec(self) -> float:
        """Wall-clock throughput: all timed tokens over all timed seconds."""
        return self.tokens_per_step * len(self.step_seconds) / sum(self.step_seconds)

    @property
    def tokens_per_sec_median(self) -> float:
        """From the median step: robust to bursts of other work on a shared machine."""
        return self.tokens_per_step / statistics.median(self.step_seconds)

    @property
    def tokens_per_cpu_sec(self) -> float | None:
        """Tokens per second of process CPU time: on a shared CPU, time spent descheduled does not count."""
        return (
            self.tokens_per_step * len(self.cpu_seconds) / sum(self.cpu_seconds) if self.cpu_seconds else None
        )

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


def _result(path, setup, step_ends, final_loss, device, flops_per_token, cpu_ends=None) -> TrainResult:
    return TrainResult(
        path=path,
        step_seconds=step_durations(step_ends, setup.warmup),
        cpu_seconds=step_durations(cpu_ends, setup.warmup) if cpu_ends else None,
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
        self.cpu_times: list[float] = []
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._step:
            self._step = trainer.global_step
            self.times.append(clock(pl_module.device))
            self.cpu_times.append(time.process_time())


PHASES = ("forward", "backward", "clip", "optimizer", "loop, hooks, data")


class PhaseClock:
    """Plain timers on the phases of a training step, the same on both sides: hooks on the model (forward pre and
    post), on the token embedding's gradient (its last accumulation ends a backward: the embedding is the first
    layer), around torch.nn.utils.clip_grad_norm_ (which build-nanogpt and Lightning both call) and on the
    optimizer's step. Each interval goes to the phase in progress; what is none of the four named phases is
    "loop, hooks, data" (zero_grad, the lr, Lightning's hooks and logging, the next batch). Timers only: a
    profiler's own allocations would change the heap both sides reuse. `start()` begins counting (after the
    warm-up); `per_step(n)` the mean ms per optimizer step over n steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.counting = False
        self._phase, self._t = "loop, hooks, data", time.perf_counter()

    def mark(self, phase: str) -> None:
        now = clock(self.device)
        if self.counting:
            self.totals[self._phase] += now - self._t
        self._phase, self._t = phase, now

    def start(self) -> None:
        self.mark(self._phase)
        self.counting = True

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        model.register_forward_pre_hook(lambda *_: self.mark("forward"))
        model.register_forward_hook(lambda *_: self.mark("backward"))
        wte = model.transformer.wte.weight  # both GPTs name it so (GPT-2's parameter names)
        wte.register_post_accumulate_grad_hook(lambda _: self.mark("loop, hooks, data"))
        optimizer.register_step_pre_hook(lambda *_: self.mark("optimizer"))
        optimizer.register_step_post_hook(lambda *_: self.mark("loop, hooks, data"))
        clip = torch.nn.utils.clip_grad_norm_

        def timed_clip(*args, **kwargs):
            self.mark("clip")
            try:
                return clip(*args, **kwargs)
            finally:
                self.mark("loop, hooks, data")

        torch.nn.utils.clip_grad_norm_ = timed_clip  # this process is the run's own (spawned)

    def per_step(self, steps: int) -> dict[str, float]:
        return {phase: 1000 * total / steps for phase, total in self.totals.items()}


class PhaseClockCallback(L.Callback):
    """PhaseClock on captioner-train's model and optimizer, counting from optimizer step `start_step`."""

    def __init__(self, device: torch.device, start_step: int):
        super().__init__()
        self.clock, self.start_step = PhaseClock(device), start_step

    def on_train_start(self, trainer, pl_module):
        self.clock.attach(pl_module.model, trainer.optimizers[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start_step and not self.clock.counting:
            self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.mark("loop, hooks, data")  # before StepTimer (after it in the callbacks) reads the clock


def run_lightning(data_dir: Path, setup: TrainSetup, device: torch.device) -> TrainResult:
    """`lightning.Trainer.fit` of `PretrainModule` for setup.total_steps optimizer steps."""
    quiet_lightning()
    torch.manual_seed(setup.seed)
    module = PretrainModule(gpt=setup.model, optim=setup.optim(), compile=setup.compile)
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
# the output layer and its loss: F.linear + F.cross_entropy vs models/loss.py's fused linear_cross_entropy


def compare_loss(
    device: torch.device, precision: str, rows: int, width: int, repeats: int = 7, vocab: int = 50304
) -> dict[str, dict]:
    """Forward + backward of the output layer and its loss on (rows, width) hidden states, alternating the two
    forms `repeats` times: median ms, and on CUDA the peak memory above the inputs. On a CPU the process first
    gets captioner-train's allocator settings (keep_freed_memory), which both forms then share."""
    import torch.nn.functional as F

    from captioner.cli.train import keep_freed_memory
    from captioner.models.loss import linear_cross_entropy

    if device.type == "cpu":
        keep_freed_memory()
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(rows, width, device=device, generator=g)
    w0 = 0.02 * torch.randn(vocab, width, device=device, generator=g)
    t = torch.randint(0, vocab, (rows,), device=device, generator=g)
    forms = {
        "F.linear + F.cross_entropy": lambda x, w: F.cross_entropy(F.linear(x, w), t),
        "linear_cross_entropy (fused)": lambda x, w: linear_cross_entropy(x, w, t),
    }
    times = {name: [] for name in forms}
    peaks = {name: 0 for name in forms}
    losses = {}
    for r in range(repeats + 1):  # the first round warms up, untimed
        for name, form in forms.items():
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = clock(device)
            with autocast(device, precision):
                loss = form(x, w)
            loss.backward()
            end = clock(device)
            if r:
                times[name].append(end - start)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - base)
            losses[name] = loss.item()
    return {
        name: {"ms": 1000 * statistics.median(times[name]), "peak_bytes": peaks[name], "loss": losses[name]}
        for name in forms
    }


def format_loss(results: dict[str, dict], rows: int, width: int) -> str:
    plain, fused = results.values()
    table_rows = [
        [name, f"{r['ms']:,.1f}", f"{r['peak_bytes'] / 2**20:,.0f}" if r["peak_bytes"] else "n/a", f"{r['loss']:.6f}"]
        for name, r in results.items()
    ]  # fmt: skip
    return (
        table(
            [f"output layer + loss, {rows:,} x {width} -> 50,304", "ms (median)", "peak MiB", "loss"],
            table_rows,
        )
        + f"\nratio fused/plain time: {fused['ms'] / plain['ms']:.3f}"
    )


# ----------------------------------------------------------------------------------------------------------------
# build-nanogpt's own model and loop vs captioner-train


class _TorchWithoutAutocast:
    """`torch` for build-nanogpt's loop at fp32: it hard-codes `torch.autocast(..., dtype=torch.bfloat16)`, its one
    precision setting, so the fp32 comparison runs it with that context as a no-op and everything else as torch."""

    @staticmethod
    def autocast(*args, **kwargs):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch, name)


def _is_periodic(stmt: ast.stmt) -> bool:
    """`if step % 250 == 0 or last_step: ...`: the loop's validation, HellaSwag, sampling and checkpoint blocks."""
    return isinstance(stmt, ast.If) and any(
        isinstance(n, ast.BinOp)
        and isinstance(n.op, ast.Mod)
        and isinstance(n.left, ast.Name)
        and n.left.id == "step"
        for n in ast.walk(stmt.test)
    )


def _lines(stmts: list[ast.stmt]) -> str:
    return ", ".join(
        f"{s.lineno}-{s.end_lineno}" if s.end_lineno != s.lineno else str(s.lineno) for s in stmts
    )


class BuildNanoGPT:
    """build-nanogpt's `train_gpt2.py`, executed from the file at run time (nothing of it is copied here).

    The file is a script whose top level sets up DDP, reads FineWeb shards from ./edu_fineweb10B and trains for
    19,073 steps, so it is not imported but parsed (`ast`) and run in pieces:
    - its imports and its class and function definitions (GPT and its blocks, GPTConfig, DataLoaderLite,
      load_tokens, get_lr, ...) run as they are, into one namespace; an import that fails (its `hellaswag`
      module, which only the evaluation uses) is skipped and named in `skipped_imports`;
    - the top-level setup is not run; `bind` sets the globals it would have set (no DDP, the device, B, T,
      grad_accum_steps, the lr schedule's constants, model, optimizer, train_loader, log_file) from the benchmark,
      building model and optimizer with the file's own `GPT(GPTConfig(...))` and `configure_optimizers` and the
      loader with its own `DataLoaderLite` (which reads ./edu_fineweb10B: the caller runs it in that directory);
    - the body of `for step in range(max_steps):` runs once per optimizer step, `step` bound, minus its periodic
      blocks (the `if`s testing `step % ...`: validation, HellaSwag, sampling, checkpoints), so what runs is
      its training step as it ships: zero_grad, micro-steps (next_batch, forward under its autocast, backward),
      clip_grad_norm_, get_lr, optimizer.step, its cuda synchronize, its tok/sec print (captured) and log line.
    At fp32 its `torch.autocast` is made a no-op (`_TorchWithoutAutocast`); under bf16-mixed it runs as shipped.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        filename = str(self.path)
        tree = ast.parse(self.path.read_text(), filename=filename)
        # a module of its own (dataclasses look their class's module up in sys.modules)
        module = types.ModuleType("build_nanogpt")
        module.__file__ = filename
        sys.modules[module.__name__] = module
        self.namespace: dict = vars(module)
        self.skipped_imports: list[str] = []
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                try:
                    exec(compile(ast.Module([node], []), filename, "exec", dont_inherit=True), self.namespace)
                except ImportError:
                    self.skipped_imports.append(ast.unparse(node))
            elif isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                exec(compile(ast.Module([node], []), filename, "exec", dont_inherit=True), self.namespace)
        loop = next(
            (
                n
                for n in tree.body
                if isinstance(n, ast.For) and isinstance(n.target, ast.Name) and n.target.id == "step"
            ),
            None,
        )
        if loop is None:
            raise ValueError(
                f"{filename}: no top-level `for step in ...:` loop; is this build-nanogpt's train_gpt2.py?"
            )
        self.kept = [s for s in loop.body if not _is_periodic(s)]
        self.dropped = [s for s in loop.body if _is_periodic(s)]
        calls = {ast.unparse(n.func) for s in self.kept for n in ast.walk(s) if isinstance(n, ast.Call)}
        if not {"optimizer.step", "loss.backward"} <= calls:
            raise ValueError(f"{filename}: the training loop has no loss.backward() and optimizer.step()")
        self.step_code = compile(ast.Module(self.kept, []), filename, "exec", dont_inherit=True)
        stored = {
            n.id
            for s in self.kept
            for n in ast.walk(s)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
        }
        loaded = {
            n.id
            for s in self.kept
            for n in ast.walk(s)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
        }
        self.free_names = loaded - stored - set(dir(builtins)) - {"step"}
        self.printed: list[str] = []

    def describe(self) -> str:
        return (
            f"build-nanogpt: {self.path} | its loop body runs (lines {_lines(self.kept)}), "
            f"periodic blocks off (lines {_lines(self.dropped)})"
            + (f" | skipped imports: {'; '.join(self.skipped_imports)}" if self.skipped_imports else "")
        )

    def _print(self, *args, **kwargs) -> None:
        self.printed.append(" ".join(str(a) for a in args))

    def bind(self, setup: TrainSetup, device: torch.device, weights: dict, log_file: Path) -> dict:
        """Set the globals of its setup code; returns the globals its loop body runs with."""
        ns = self.namespace
        c = OptimConfig(**setup.optim())
        ns.update(
            print=self._print, ddp=False, ddp_rank=0, ddp_local_rank=0, ddp_world_size=1, master_process=True,
            device=str(device), device_type="cuda" if device.type == "cuda" else "cpu", use_compile=False,
            B=setup.micro_batch, T=setup.seq_len, grad_accum_steps=setup.accum, log_file=str(log_file),
            max_lr=c.lr, min_lr=c.lr * c.min_lr_ratio, warmup_steps=c.warmup_steps, max_steps=c.max_steps,
        )  # fmt: skip
        # its config's fields (block_size, vocab_size, n_layer, n_head, n_embd): ours has more (gelu, ...)
        theirs = {f.name for f in fields(ns["GPTConfig"])}
        shape = {k: v for k, v in asdict(setup.gpt_config()).items() if k in theirs}
        model = ns["GPT"](ns["GPTConfig"](**shape))
        model.load_state_dict(weights)  # the same initial weights as ours (GPT-2 parameter names on both)
        model.to(device)
        ns["model"] = ns["raw_model"] = model
        ns["optimizer"] = model.configure_optimizers(
            weight_decay=c.weight_decay, learning_rate=c.lr, device_type=ns["device_type"]
        )
        ns["train_loader"] = ns["DataLoaderLite"](
            B=setup.micro_batch, T=setup.seq_len, process_rank=0, num_processes=1, split="train"
        )
        missing = sorted(name for name in self.free_names if name not in ns)
        if missing:
            raise ValueError(
                f"{self.path}: its training loop reads names this benchmark does not set: {missing}"
            )
        return dict(ns, torch=_TorchWithoutAutocast()) if setup.precision == "32-true" else dict(ns)


BNG_DATA_DIR = "edu_fineweb10B"  # DataLoaderLite's data_root, relative to the working directory


def run_bng(
    bng: BuildNanoGPT, root: Path, setup: TrainSetup, device: torch.device, phases: PhaseClock | None = None
) -> TrainResult:
    """build-nanogpt's training step for setup.total_steps optimizer steps on the shards in root/edu_fineweb10B,
    starting from our GPT's initial weights for setup.seed; `phases` times the phases of the timed steps."""
    torch.manual_seed(setup.seed)
    weights = GPT(setup.gpt_config()).state_dict()
    step_ends, cpu_ends = [], []
    with contextlib.chdir(root):  # DataLoaderLite opens ./edu_fineweb10B/<shard> whenever it moves on
        loop_globals = bng.bind(setup, device, weights, root / "bng_log.txt")
        for step in range(setup.total_steps):
            loop_globals["step"] = step
            if phases is not None and step == setup.warmup:
                if not phases.counting:
                    phases.attach(loop_globals["model"], loop_globals["optimizer"])
                phases.start()
            exec(bng.step_code, loop_globals)
            if phases is not None:
                phases.mark("loop, hooks, data")  # the step's tail counts before its clock is read
            step_ends.append(clock(device))
            cpu_ends.append(time.process_time())
    final_loss = float(loop_globals["loss_accum"])
    flops = GPT(setup.gpt_config()).flops_per_token(setup.seq_len)
    return _result("build-nanogpt", setup, step_ends, final_loss, device, flops, cpu_ends)


def captioner_train_overrides(
    data_dir: Path, run_dir: Path, setup: TrainSetup, device: torch.device
) -> list[str]:
    """`captioner-train experiment=demo_pretrain` at the benchmark's shapes, without validation or HellaSwag, reading
    the same windows in file order (data.shuffle=false) as build-nanogpt's DataLoaderLite, CSV logger only."""
    c = OptimConfig(**setup.optim())
    return [
        "experiment=demo_pretrain", f"paths.run_dir={run_dir}", "logger=none",
        f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}", f"trainer.precision={setup.precision}",
        f"trainer.max_steps={setup.total_steps}", f"seed={setup.seed}",
        f"model.gpt.name={setup.model}", "model.gpt.vocab_ids=null", "model.gpt.wte_std=0.02",  # GPT-2's
        f"model.compile={setup.compile}", "model.hellaswag.path=null",
        f"model.optim.lr={c.lr}", f"model.optim.warmup_steps={c.warmup_steps}", f"model.optim.max_steps={c.max_steps}",
        f"data.data_dir={data_dir}", f"data.seq_len={setup.seq_len}", f"data.micro_batch_size={setup.micro_batch}",
        f"data.total_batch_tokens={setup.tokens_per_step}", f"data.val_tokens={setup.seq_len}", "data.shuffle=false",
        "data.num_workers=0", "val_every_n_steps=1000000", "ckpt_every_n_steps=1000000", "validate_at_end=false",
    ]  # fmt: skip


def run_captioner_train(
    data_dir: Path,
    run_dir: Path,
    setup: TrainSetup,
    device: torch.device,
    overrides: tuple[str, ...] = (),
    phases: PhaseClockCallback | None = None,
) -> TrainResult:
    """captioner-train's `train(cfg)` (our Trainer, callbacks, logger, PretrainModule, TokenShardDataModule), with
    a step clock (and `phases`) appended to its callbacks; its console output is captured."""
    from hydra import compose, initialize_config_dir

    from captioner.cli.train import CONFIG_DIR, cli_callbacks, train

    quiet_lightning()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=[*captioner_train_overrides(data_dir, run_dir, setup, device), *overrides]
        )
    timer = StepTimer()
    extra = [*([phases] if phases else []), timer]
    with contextlib.redirect_stdout(io.StringIO()):
        metrics = train(cfg, callbacks=[*extra, *cli_callbacks(cfg)])  # as the command runs it
    flops = GPT(setup.gpt_config()).flops_per_token(setup.seq_len)
    return _result(
        "captioner-train", setup, timer.times, metrics["train/loss"], device, flops, timer.cpu_times
    )


OURS = "captioner-train"
BNG_SHIPPED = "build-nanogpt"  # its process as it ships: glibc's default allocator
BNG_EQUAL = "build-nanogpt, our allocator"  # the same process with captioner-train's CPU allocator settings
ALLOCATOR_SIDES = {"both": (BNG_EQUAL, BNG_SHIPPED), "equal": (BNG_EQUAL,), "shipped": (BNG_SHIPPED,)}


def _run_side(side, bng_path, root, run_dir, setup, device, threads, overrides, profile=False):
    """One run in a fresh process (see compare_bng); returns its result, build-nanogpt's last printed line and,
    when asked, its PhaseClock's ms per timed step."""
    device = torch.device(device)
    torch.set_num_threads(threads)
    setup_backend(device)
    if side == OURS:
        callback = PhaseClockCallback(device, setup.warmup) if profile else None
        result = run_captioner_train(root / BNG_DATA_DIR, run_dir, setup, device, overrides, callback)
        return result, None, callback.clock.per_step(setup.steps) if callback else None
    if side == BNG_EQUAL and device.type == "cpu":
        from captioner.cli.train import keep_freed_memory

        keep_freed_memory()  # what captioner-train's KeepFreedMemory callback calls on a CPU, before any step
    bng = BuildNanoGPT(bng_path)
    phases = PhaseClock(device) if profile else None
    result = run_bng(bng, root, setup, device, phases)
    per_step = phases.per_step(setup.steps) if phases else None
    return replace(result, path=side), bng.printed[-1] if bng.printed else None, per_step


def compare_bng(
    bng: BuildNanoGPT,
    setup: TrainSetup,
    device: torch.device,
    repeats: int = 3,
    overrides: tuple[str, ...] = (),
    allocator: str = "both",
    profiles: dict[str, dict[str, float]] | None = None,
) -> dict[str, list[TrainResult]]:
    """build-nanogpt's loop and captioner-train, `repeats` runs each in alternating order (ABC, CBA, ...) on the
    same shard files. allocator: which build-nanogpt sides run (`ALLOCATOR_SIDES`): with captioner-train's CPU
    allocator settings (equal footing), as it ships, or both. On a GPU both sides use CUDA's caching allocator,
    and only the shipped side runs.

    Every run has a process of its own (spawned): what one side sets for the process (captioner-train's
    allocator settings on a CPU, compiled code, the heap a run leaves behind) never reaches another. `profiles`
    (a dict to fill): each side's first run also times the phases of its steps (`PhaseClock`)."""
    theirs = ALLOCATOR_SIDES[allocator] if device.type == "cpu" else (BNG_SHIPPED,)
    runs: dict[str, list[TrainResult]] = {side: [] for side in (*theirs, OURS)}
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench_bng_") as tmp:
        root = Path(tmp)
        write_token_shards(root / BNG_DATA_DIR, setup)
        for r in range(repeats):
            for side in list(runs)[:: 1 if r % 2 == 0 else -1]:
                args = (
                    side,
                    bng.path,
                    root,
                    root / f"run{r}",
                    setup,
                    str(device),
                    torch.get_num_threads(),
                    overrides,
                    profiles is not None and r == 0,
                )
                with spawn.Pool(1) as pool:
                    result, printed, profile = pool.apply(_run_side, args)
                runs[side].append(result)
                if printed:
                    bng.printed.append(printed)
                if profile is not None:
                    profiles[side] = profile
    return runs


def _pooled(results: list[TrainResult]) -> TrainResult:
    def pool(name):
        values = [getattr(r, name) for r in results]
        return None if None in values else [s for v in values for s in v]

    return replace(results[0], step_seconds=pool("step_seconds"), cpu_seconds=pool("cpu_seconds"))


def format_profiles(profiles: dict[str, dict[str, float]]) -> str:
    """ms per optimizer step in each phase (`PhaseClock`), per side, and their sum."""
    rows = [[phase, *(f"{p[phase]:,.1f}" for p in profiles.values())] for phase in PHASES]
    rows.append(["step", *(f"{sum(p.values()):,.1f}" for p in profiles.values())])
    return table(["ms per optimizer step (first run of each side)", *profiles], rows)


def format_bng(runs: dict[str, list[TrainResult]]) -> str:
    """Per run, then per side pooled over its runs with the per-run range, then the ratios ours/theirs for each
    build-nanogpt side, the equal-allocator one first (the headline: what our own code costs); on a CPU the same
    again per second of process CPU time (robust to other processes taking the core)."""
    cpu = all(r.cpu_seconds for results in runs.values() for r in results) and runs[OURS][0].mfu is None
    rows = []
    for r in range(len(runs[OURS])):
        for side, results in runs.items():
            res = results[r]
            rows.append(
                [f"{r + 1}", side, f"{res.tokens_per_sec:,.0f}", f"{res.tokens_per_sec_median:,.0f}",
                 f"{1000 * res.tokens_per_step / res.tokens_per_sec:.1f}",
                 *([f"{res.tokens_per_cpu_sec:,.0f}"] if cpu else []), f"{res.final_loss:.6f}"]
            )  # fmt: skip
    headers = ["run", "side", "tokens/s", "tokens/s (median step)", "ms/step"]
    headers += ["tokens/CPU-s"] if cpu else []
    out = [table([*headers, "final loss"], rows, left=2), ""]
    metrics = [("tokens/s", "tokens_per_sec"), ("tokens/s median step", "tokens_per_sec_median")]
    metrics += [("tokens/CPU-s", "tokens_per_cpu_sec")] if cpu else []
    summary = []
    for label, attr in metrics:
        for side, results in runs.items():
            per_run = [getattr(res, attr) for res in results]
            summary.append(
                [label, side, f"{getattr(_pooled(results), attr):,.0f}", f"{min(per_run):,.0f}-{max(per_run):,.0f}"]
            )  # fmt: skip
    out.append(table(["measure", "side", "all runs", "per-run min-max"], summary, left=2))
    ours = runs[OURS]
    for side in (s for s in (BNG_EQUAL, BNG_SHIPPED) if s in runs):
        out.append(f"\ncaptioner-train / {side}:")
        for label, attr in metrics:
            pair = [getattr(a, attr) / getattr(b, attr) for a, b in zip(ours, runs[side])]
            out.append(
                f"  {label}: {statistics.median(pair):.3f} median of {len(pair)} run pairs "
                f"({min(pair):.3f}-{max(pair):.3f}), pooled {getattr(_pooled(ours), attr) / getattr(_pooled(runs[side]), attr):.3f}"
            )
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# HellaSwag scoring


# ----------------------------------------------------------------------------------------------------------------
# command line

GPU_DEFAULTS = dict(model="gpt2_124m", micro_batch=8, seq_len=1024, accum=2, steps=20, warmup=5, repeats=1)
CPU_DEFAULTS = dict(model="demo", micro_batch=4, seq_len=128, accum=2, steps=8, warmup=2, repeats=2)
# --bng: issue #10's comparison (CPU: demo GPT, 8 x 128 x accumulation 4, three runs a side)
BNG_GPU_DEFAULTS = dict(
    model="gpt2_124m", micro_batch=16, seq_len=1024, accum=4, steps=10, warmup=3, repeats=3
)
BNG_CPU_DEFAULTS = dict(model="demo", micro_batch=8, seq_len=128, accum=4, steps=10, warmup=2, repeats=3)


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
    p.add_argument("--accum", type=int, help="micro-batches per optimizer step (default 2; --bng: 4)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per run (GPU: 20, CPU: 8)")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps first, >= 1 (GPU: 5, CPU: 2)")
    p.add_argument("--repeats", type=int, help="runs per path in ABBA order, steps pooled (GPU: 1, CPU: 2)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: 1 on CPU, torch's choice with CUDA)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training forward on both paths (--bng: ours only)",
    )
    p.add_argument(
        "--bng",
        metavar="PATH/train_gpt2.py",
        help="instead: build-nanogpt's own GPT and training loop, executed from this file, vs captioner-train\n"
        "(CPU: demo GPT, 8 x 128 x accum 4, 3 runs a side; GPU: gpt2_124m, 16 x 1024 x accum 4)",
    )
    p.add_argument(
        "--bng-allocator",
        choices=sorted(ALLOCATOR_SIDES),
        default="both",
        help="with --bng on a CPU: run build-nanogpt with captioner-train's allocator settings (equal, the\n"
        "headline ratio), as it ships (glibc's default: it page-faults its activations in every step), or both",
    )
    p.add_argument(
        "--loss",
        action="store_true",
        help="instead: the output layer + loss alone, plain vs fused, at micro-batch x seq rows and the model's\n"
        "width (forward + backward; peak memory on CUDA)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="with --bng: also time the phases of each side's steps (forward, backward, clip, optimizer, the\n"
        "rest) with plain timers in its first run",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --bng: a captioner-train override (repeatable), e.g. model.compile=true, logger=default",
    )
    args = p.parse_args(argv)
    if args.bng:
        return fill_defaults(args, BNG_CPU_DEFAULTS, BNG_GPU_DEFAULTS)
    return fill_defaults(args, CPU_DEFAULTS, GPU_DEFAULTS)


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
    if args.loss:
        rows = setup.micro_batch * setup.seq_len
        results = compare_loss(device, setup.precision, rows, config.n_embd)
        print(format_loss(results, rows, config.n_embd))
        return
    if args.bng:
        bng = BuildNanoGPT(args.bng)
        print(bng.describe())
        overrides = " ".join(args.override)
        print(
            f"captioner-train experiment=demo_pretrain (+ the benchmark's shapes){' ' + overrides if overrides else ''}\n"
        )
        profiles = {} if args.profile else None
        runs = compare_bng(
            bng, setup, device, args.repeats, tuple(args.override), args.bng_allocator, profiles
        )
        print(format_bng(runs))
        if profiles:
            print("\n" + format_profiles(profiles))
        print(f"build-nanogpt's last line: {bng.printed[-1] if bng.printed else '(none)'}")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        return
    print(format_training(compare_training(setup, device, repeats=args.repeats)))


if __name__ == "__main__":
    main()
