"""GPU readiness check and issue #10's GPU figures: one run of under 8 minutes on an H100/H200 (--quick less) that
says whether this machine trains, evaluates and decodes the project at full speed. No internet, no extra packages:
random weights, generated data.

    python scripts/gpu_check.py --bng bng/train_gpt2.py   # on the GPU machine (the --bng file: see below)
    python scripts/gpu_check.py --quick                   # fewer caption iterations, no micro-batch 64 / compile check
    python scripts/gpu_check.py --quick --device cpu      # CUDA-only checks say "skipped (no CUDA)"

Checks, most important first; each prints its own details, a failure prints its traceback and the next check
runs; a summary table closes the run (exit status 1 if any check failed):
  environment        torch / CUDA / cuDNN versions, device name, memory
  bf16               bf16 supported, and a bf16 matmul agrees with fp32
  flash attention    SDPA's FLASH backend alone runs our causal self-attention and the gated cross-attention
                     (GPT-2 124M shapes, bf16, forward + backward), matching the MATH backend
  caption            feature-cache and training ratios at the real sizes; beam-3 decoding without a cache, with
                     the static KV cache, and with the CUDA-graph step (goal >= 5x no-cache at 32 images, a step
                     <= 1.5 ms for 96 sequences, captions identical to the eager cache's)
  hellaswag          10,042 generated examples with HellaSwag's length profile through GPT-2 124M, packed (goal
                     <= 4 s warm; cold reported), and packed vs padded on a tenth
  captioner-train    GPT-2 124M compiled at 32 x 1024 (and 64): tokens/s and MFU (goal >= 50 %), peak memory
  build-nanogpt      its own loop as it ships (eager) vs captioner-train compiled, 16 x 1024 (goal >= 1.5x);
                     needs --bng PATH (`git show HEAD:train_gpt2.py` of a build-nanogpt checkout, placed in the
                     working tree untracked so it travels to the GPU machine)
  fsdp               captioner-train trainer=fsdp: 6 steps with checkpoints, then 2 more resumed
  pretrain ...       plain PyTorch loop vs the Lightning path, 8 x 1024 eager (bench_pretrain.compare_training)
  torch.compile      the compiled GPT-2 training forward + backward matches eager (bf16 tolerance)

Checks that would start after --time-limit seconds (counting their rough cost) are skipped, so the summary is
printed in time; the order above decides what is dropped first.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bench_caption
import bench_hellaswag
import bench_pretrain
import torch

from captioner.models.captioner import GatedCrossAttention
from captioner.models.gpt import GPT, CausalSelfAttention, GPTConfig
from captioner.tokenizer import N_VOCAB


class Skip(Exception):
    """A check that does not apply here; its message says why."""


@dataclass
class Check:
    name: str
    run: Callable[[], str]  # returns a one-line result for the summary
    cost_s: float  # rough duration on an H100, for --time-limit


def need_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise Skip("no CUDA")


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


# ----------------------------------------------------------------------------------------------------------------
# checks


def check_environment(device: torch.device) -> str:
    import lightning
    import transformers

    print(f"python {platform.python_version()} | torch {torch.__version__} | lightning {lightning.__version__} | "
          f"transformers {transformers.__version__}")  # fmt: skip
    if device.type != "cuda":
        print(f"CUDA available: {torch.cuda.is_available()}; running on {device}")
        return f"torch {torch.__version__}, no CUDA ({device})"
    props = torch.cuda.get_device_properties(device)
    print(f"CUDA runtime {torch.version.cuda} | cuDNN {torch.backends.cudnn.version()} | "
          f"{torch.cuda.device_count()} GPU(s)")  # fmt: skip
    print(f"device {props.name} | compute capability {props.major}.{props.minor} | "
          f"{props.total_memory / 2**30:.1f} GiB | {props.multi_processor_count} SMs")  # fmt: skip
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {props.name}"


def check_bf16(device: torch.device) -> str:
    need_cuda(device)
    supported = torch.cuda.is_bf16_supported()
    print(f"torch.cuda.is_bf16_supported(): {supported}")
    if not supported:
        raise AssertionError("bf16 is not supported on this GPU: bf16-mixed training will not work")
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    err = rel_error(a.bfloat16() @ b.bfloat16(), a @ b)
    print(f"bf16 matmul vs fp32: relative error {err:.2e}")
    if err > 1e-2:
        raise AssertionError(f"bf16 matmul relative error {err:.2e} > 1e-2")
    return f"supported, matmul rel err {err:.1e}"


def _attention_backends(module, inputs: tuple, device: torch.device) -> tuple[float, float]:
    """Run module(*inputs) forward + backward under bf16 autocast with only FLASH, then only MATH; returns the
    relative errors of the output and of the input gradient."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    outs, grads = [], []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        with sdpa_kernel(backend), torch.autocast(device.type, dtype=torch.bfloat16):
            y = module(*leaves)  # (B, T, C)
        y.float().square().mean().backward()
        outs.append(y.detach())
        grads.append(leaves[0].grad)
    return rel_error(outs[0], outs[1]), rel_error(grads[0], grads[1])


def check_flash(device: torch.device) -> str:
    """With only the FLASH backend allowed, SDPA raises "No available kernel" rather than falling back, so running
    at all proves flash serves these shapes."""
    need_cuda(device)
    torch.manual_seed(0)
    cfg = GPTConfig.named("gpt2_124m")
    attn = CausalSelfAttention(cfg.n_embd, cfg.n_head).to(
        device
    )  # fp32 weights, bf16 autocast: as in training
    x = torch.randn(8, cfg.block_size, cfg.n_embd, device=device)  # (B, T, C)
    out_err, grad_err = _attention_backends(attn, (x,), device)
    hs = cfg.n_embd // cfg.n_head
    print(f"causal self-attention (8, {cfg.n_head}, {cfg.block_size}, {hs}) flash vs math: output rel err {out_err:.2e}, "
          f"grad rel err {grad_err:.2e}")  # fmt: skip

    xattn = GatedCrossAttention(cfg.n_embd, cfg.n_head).to(device)
    with torch.no_grad():  # open the gates, or the attention's output would not reach y
        xattn.attn_gate.fill_(1.0)
        xattn.ff_gate.fill_(1.0)
    text = torch.randn(32, 24, cfg.n_embd, device=device)  # (B, T, C) caption tokens
    image = torch.randn(32, 50, cfg.n_embd, device=device)  # (B, N, C) ViT-B/32 tokens
    # compare the layer's contribution: the residual stream it adds to would hide any difference
    x_out, x_grad = _attention_backends(lambda t, i: xattn(t, i) - t, (text, image), device)
    print(f"gated cross-attention (32, {cfg.n_head}, 24 x 50, {hs}) flash vs math: output rel err {x_out:.2e}, "
          f"grad rel err {x_grad:.2e}")  # fmt: skip
    # bf16 rounding of the outputs is ~4e-3; the gradients go through one more bf16 product
    if max(out_err, x_out) > 2e-2 or max(grad_err, x_grad) > 5e-2:
        raise AssertionError(f"flash and math attention differ: outputs {out_err:.2e}/{x_out:.2e} (limit 2e-2), "
                             f"gradients {grad_err:.2e}/{x_grad:.2e} (limit 5e-2)")  # fmt: skip
    worst = max(out_err, grad_err, x_out, x_grad)
    return f"flash runs self + cross attention, max rel err vs math {worst:.1e}"


def check_compile(device: torch.device, batch: int) -> str:
    need_cuda(device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.named("gpt2_124m")).to(device)
    T = model.config.block_size
    x = torch.randint(0, N_VOCAB, (batch, T), device=device)  # (B, T)
    y = torch.randint(0, N_VOCAB, (batch, T), device=device)  # (B, T)

    def loss_and_grads(forward):
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = forward(x, y)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        return float(loss.detach()), grads

    eager_loss, eager_grads = loss_and_grads(model)
    start = bench_pretrain.clock(device)
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model))
    compile_s = bench_pretrain.clock(device) - start
    grad_err = rel_error(compiled_grads, eager_grads)
    print(f"GPT-2 124M, ({batch}, {T}), bf16 autocast: eager loss {eager_loss:.5f}, compiled {compiled_loss:.5f}; "
          f"gradient rel err {grad_err:.2e}; first compiled step {compile_s:.1f} s")  # fmt: skip
    if abs(eager_loss - compiled_loss) > 2e-2 or grad_err > 5e-2:
        raise AssertionError(
            f"compiled differs from eager: loss {compiled_loss} vs {eager_loss}, gradient rel err {grad_err:.2e}"
        )
    return f"loss diff {abs(eager_loss - compiled_loss):.1e}, grad rel err {grad_err:.1e}, compile {compile_s:.0f} s"


def check_pretrain(device: torch.device, setup: bench_pretrain.TrainSetup) -> str:
    if setup.compile:
        need_cuda(device)  # inductor on CPU needs a C++ toolchain and minutes; not what this check is for
    print(f"{setup.model}, micro-batch {setup.micro_batch} x {setup.seq_len} x accum {setup.accum}, {setup.precision}, "
          f"{setup.steps} timed steps after {setup.warmup}")  # fmt: skip
    results = bench_pretrain.compare_training(setup, device, repeats=1)
    print(bench_pretrain.format_training(results))
    plain, lightning = results["plain"], results["lightning"]
    mfu = f", MFU {100 * plain.mfu:.0f}%/{100 * lightning.mfu:.0f}%" if plain.mfu and lightning.mfu else ""
    return (
        f"plain {plain.tokens_per_sec:,.0f} tok/s, lightning {lightning.tokens_per_sec:,.0f} tok/s "
        f"(x{lightning.tokens_per_sec / plain.tokens_per_sec:.2f}){mfu}"
    )


def check_train_mfu(device: torch.device, micro_batch: int) -> str:
    """captioner-train (our Trainer, callbacks, PretrainModule) on GPT-2 124M, compiled, bf16, at `micro_batch`
    x 1024: tokens/s and MFU (goal >= 50 %). The recipe's 524,288-token step only changes the accumulation."""
    need_cuda(device)
    setup = bench_pretrain.TrainSetup(model="gpt2_124m", micro_batch=micro_batch, seq_len=1024, accum=2,
                                      steps=8, warmup=4, precision="bf16-mixed", compile=True)  # fmt: skip
    torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_mfu_") as tmp:
        data = bench_pretrain.write_token_shards(Path(tmp) / "tokens", setup)
        result = bench_pretrain.run_captioner_train(data, Path(tmp) / "run", setup, device)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    mfu = f", MFU {100 * result.mfu:.1f}%" if result.mfu else ""
    print(f"captioner-train {micro_batch}x1024 compiled: {result.tokens_per_sec:,.0f} tok/s{mfu}, "
          f"peak memory {peak_gib:.1f} GiB, final loss {result.final_loss:.4f}")  # fmt: skip
    return f"{result.tokens_per_sec:,.0f} tok/s{mfu}, {peak_gib:.0f} GiB"


def check_bng(device: torch.device, path: str | None) -> str:
    """build-nanogpt's own loop as it ships (eager, from --bng PATH/train_gpt2.py) vs captioner-train compiled,
    GPT-2 124M 16 x 1024 x 4, bf16 (goal >= 1.5x)."""
    need_cuda(device)
    if not path:
        raise Skip("no --bng PATH/train_gpt2.py")
    setup = bench_pretrain.TrainSetup(model="gpt2_124m", micro_batch=16, seq_len=1024, accum=4, steps=8,
                                      warmup=4, precision="bf16-mixed", compile=True)  # fmt: skip
    runs = bench_pretrain.compare_bng(bench_pretrain.BuildNanoGPT(path), setup, device, repeats=1)
    print(bench_pretrain.format_bng(runs))
    ours, theirs = runs["captioner-train"][0], runs["build-nanogpt"][0]
    return f"captioner-train {ours.tokens_per_sec / theirs.tokens_per_sec:.2f}x build-nanogpt's loop"


def check_caption(device: torch.device, settings: bench_caption.Settings) -> str:
    print(f"batch {settings.batch}, {settings.images} JPEGs, {settings.iters} timed after {settings.warmup}, "
          f"{settings.precision}, (b) loader workers {settings.num_workers}")  # fmt: skip
    result = bench_caption.run(["real"], settings, device)[0]
    print(bench_caption.format_size(result, settings))
    r = bench_caption.ratios(result)
    decode = ", ".join(f"{v:.1f}x @{k.split('@')[1]}" for k, v in r.items() if k.startswith("decode_kv_x"))
    graph = ", ".join(f"{v:.1f}x @{k.split('@')[1]}" for k, v in r.items() if k.startswith("decode_graph_x"))
    step = ""
    for d in result["decoding"]:
        if "cuda graph" in d:
            same = sum(a == b for a, b in zip(d["cuda graph"]["captions"], d["kv cache"]["captions"]))
            print(f"beam-3 x{d['batch']} images: CUDA graph {1000 * d['cuda graph']['seconds'] / 20:.2f} ms/step "
                  f"(goal <= 1.5 ms at 32 images); captions identical to the eager KV cache: {same}/{d['batch']}")  # fmt: skip
            if d["batch"] == 32:
                step = f", graph step {1000 * d['cuda graph']['seconds'] / 20:.2f} ms @32"
            if same != d["batch"]:
                raise AssertionError(
                    f"CUDA-graph captions differ from the eager KV cache's ({same}/{d['batch']})"
                )
    return (
        f"feature cache {r['vision_cache_x']:.0f}x vision, {r['train_cache_x']:.2f}x train step; "
        f"KV cache {decode}; CUDA graph {graph or 'n/a'}{step}"
    )


def check_hellaswag(device: torch.device, n: int, batch_size: int) -> str:
    """All of HellaSwag's validation size (generated examples, its length profile) through GPT-2 124M, packed:
    cold and warm seconds (goal <= 4 s warm); packed vs padded on a tenth of it, with identical counts."""
    need_cuda(device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.named("gpt2_124m"))
    examples = bench_hellaswag.generated_examples(n)
    print(bench_hellaswag.token_profile(examples[:1000]) + " (first 1,000)")
    full = bench_hellaswag.compare(model, examples, device, "bf16-mixed", batch_size=batch_size, repeats=2,
                                   methods=("packed",))  # fmt: skip
    print(bench_hellaswag.format_results(full, n))
    part = bench_hellaswag.compare(model, examples[: n // 10], device, "bf16-mixed", batch_size=batch_size,
                                   repeats=1, methods=("packed", "padded"))  # fmt: skip
    print(bench_hellaswag.format_results(part, n // 10))
    packed = full["packed"]
    ratio = part["padded"]["warm"] / part["packed"]["warm"]
    return f"{n:,} examples packed: {packed['warm']:.2f} s warm, {packed['cold']:.2f} s cold; {ratio:.1f}x padded"


def _train(run_dir: Path, overrides: list[str]) -> None:
    """captioner-train in a subprocess (a fresh process, as a user runs it); its output goes to run_dir/out.txt."""
    cmd = [sys.executable, "-m", "captioner.cli.train", f"hydra.run.dir={run_dir}", *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (run_dir / "out.txt").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "out.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print((proc.stdout + proc.stderr)[-3000:])
        raise AssertionError(f"captioner-train exited {proc.returncode}: {' '.join(overrides)}")


def check_fsdp(device: torch.device) -> str:
    """`captioner-train experiment=pretrain_gpt2_124m trainer=fsdp` on this GPU (one device is a real FSDP run,
    one shard): 6 steps of 65,536 tokens on random token shards with checkpoints, then resumed for 2 more."""
    need_cuda(device)
    import numpy as np

    from captioner.data.shards import shard_path, write_shard

    with tempfile.TemporaryDirectory(prefix="gpu_check_fsdp_") as tmp:
        data, run = Path(tmp) / "tokens", Path(tmp) / "run"
        rng = np.random.default_rng(0)
        for split, index, n in (("val", 0, 2**17), ("train", 1, 2**20)):
            write_shard(
                shard_path(data, "edufineweb", split, index), rng.integers(0, 50257, n, dtype=np.uint16)
            )
        common = [
            "experiment=pretrain_gpt2_124m", "trainer=fsdp", "trainer.devices=1", f"data.data_dir={data}",
            "data.total_batch_tokens=65536", "data.val_tokens=65536", "model.hellaswag.path=null",
            "model.compile=false", "val_every_n_steps=3", "ckpt_every_n_steps=3",
        ]  # fmt: skip
        _train(run, [*common, "trainer.max_steps=6"])
        ckpt = run / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            raise AssertionError(f"no {ckpt} after the FSDP run")
        _train(run, [*common, "trainer.max_steps=8", f"ckpt_path={ckpt}"])
        with open(run / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
        steps = sorted({int(r["step"]) for r in rows})
        losses = [float(r["train/loss"]) for r in rows]
        print(f"steps logged {steps}; train/loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        if steps[-1] < 7 or not all(math.isfinite(x) for x in losses):
            raise AssertionError(f"FSDP run + resume logged steps {steps}, losses {losses}")
        tok_s = [float(r["train/tokens_per_sec"]) for r in rows if r.get("train/tokens_per_sec")]
        speed = f", {tok_s[-1]:,.0f} tok/s" if tok_s else ""
        return f"8 steps (6 + 2 resumed) finite loss {losses[0]:.2f} -> {losses[-1]:.2f}{speed}"


# ----------------------------------------------------------------------------------------------------------------
# the run


def plan(device: torch.device, quick: bool, bng: str | None) -> list[Check]:
    """The checks, most important first (a time limit drops the last ones)."""
    cuda = device.type == "cuda"
    checks = [
        Check("environment", lambda: check_environment(device), 1),
        Check("bf16", lambda: check_bf16(device), 2),
        Check("flash attention", lambda: check_flash(device), 5),
    ]
    if cuda:
        caption = bench_caption.Settings(**bench_caption.GPU_DEFAULTS, precision="bf16-mixed")
        caption.decode_repeats = 2
        caption.iters, caption.decode_batches = (6, (32,)) if quick else (10, (32, 128))
        shapes = dict(model="gpt2_124m", seq_len=1024, accum=2, steps=10, warmup=3, precision="bf16-mixed")
    else:  # stand-ins that exercise the same code on a CPU in seconds
        caption = bench_caption.Settings(batch=4, images=8, warmup=1, iters=2, decode_batches=(1,))
        shapes = dict(model="tiny", seq_len=64, accum=2, steps=3, warmup=1, precision="32-true")
    checks += [
        Check("caption (real sizes, CUDA-graph decode)", lambda: check_caption(device, caption), 50),
        Check("hellaswag 10,042 packed", lambda: check_hellaswag(device, 10042, 256), 40),
        Check("captioner-train 32x1024 compiled (MFU)", lambda: check_train_mfu(device, 32), 80),
        Check("captioner-train vs build-nanogpt", lambda: check_bng(device, bng), 90),
        Check("fsdp (captioner-train, 1 GPU)", lambda: check_fsdp(device), 60),
    ]
    setup = bench_pretrain.TrainSetup(micro_batch=8 if cuda else 2, **shapes)
    checks.append(Check(f"pretrain {setup.model} {setup.micro_batch}x{setup.seq_len} eager, plain vs Lightning",
                        lambda: check_pretrain(device, setup), 15))  # fmt: skip
    if not quick:
        checks.append(
            Check("captioner-train 64x1024 compiled (MFU)", lambda: check_train_mfu(device, 64), 80)
        )
        checks.append(Check("torch.compile vs eager", lambda: check_compile(device, batch=8), 60))
    return checks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", default=bench_pretrain.default_device(), help="cuda (default when available) or cpu"
    )
    p.add_argument("--quick", action="store_true", help="micro-batch 8 only, fewer caption iterations")
    p.add_argument(
        "--time-limit", type=float, default=470, help="skip checks that would end later (s; 0: never)"
    )
    p.add_argument("--bng", help="build-nanogpt's train_gpt2.py, for the side-by-side training check")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bench_pretrain.quiet_lightning()
    bench_pretrain.setup_backend(device)
    bench_pretrain.set_cpu_threads(device, None)
    # One static shape per compiled model, as in a training run (which never sees a second micro-batch size)
    torch._dynamo.config.automatic_dynamic_shapes = False
    print(f"gpu_check {'--quick ' if args.quick else ''}on {device}")

    start = time.perf_counter()
    summary = []
    for check in plan(device, args.quick, args.bng):
        elapsed = time.perf_counter() - start
        print(f"\n=== {check.name} ===", flush=True)
        if args.time_limit and elapsed + check.cost_s > args.time_limit:
            status, result, seconds = (
                "skipped",
                f"time limit ({elapsed:.0f} s used of {args.time_limit:.0f})",
                0.0,
            )
        else:
            t0 = time.perf_counter()
            try:
                status, result = "ok", check.run()
            except Skip as why:
                status, result = "skipped", str(why)
            except Exception as err:  # every check reports and the run goes on
                traceback.print_exc(file=sys.stdout)
                status, result = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:100]
            seconds = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"--> {status}: {result}" if status != "skipped" else f"--> skipped ({result})", flush=True)
        summary.append([check.name, status, result, f"{seconds:.0f}"])

    print(f"\n=== summary ({time.perf_counter() - start:.0f} s) ===")
    print(bench_pretrain.table(["check", "status", "result", "s"], summary, left=3))
    return 1 if any(row[1] == "FAIL" for row in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
