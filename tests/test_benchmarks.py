"""The benchmark scripts still run (tiny sizes, CPU): they import the package's internals, so a rename breaks them
silently otherwise. Their numbers are not checked here, only that both sides of each comparison did the same work."""

import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(autouse=True)
def scripts_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    for name in ("bench_pretrain", "bench_hellaswag", "bench_caption", "gpu_check"):
        sys.modules.pop(name, None)


def test_plain_loop_and_lightning_train_alike():
    import bench_pretrain

    setup = bench_pretrain.TrainSetup(model="tiny", micro_batch=2, seq_len=32, accum=2, steps=2, warmup=1)
    results = bench_pretrain.compare_training(setup, torch.device("cpu"))
    plain, lightning = results["plain"], results["lightning"]
    assert len(plain.step_seconds) == len(lightning.step_seconds) == 2
    assert plain.final_loss == pytest.approx(lightning.final_loss, rel=1e-4)


def test_hellaswag_methods_agree(capsys):
    import bench_hellaswag

    bench_hellaswag.main(["--device", "cpu", "--examples", "6", "--model", "tiny", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "counts identical across methods: yes" in out and "packed" in out and "one at a time" in out


# build-nanogpt's train_gpt2.py as `bench_pretrain --bng` reads it: GPT/GPTConfig/DataLoaderLite at the top level
# (its GPT here is ours under its config's five fields, so the test runs offline), setup code the benchmark
# replaces, and its `for step` loop with a periodic block the benchmark must drop (this one would fail if run)
FAKE_BNG = """
import math, os, time
from dataclasses import dataclass
import numpy as np
import torch
from captioner.models import gpt as ours

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

class GPT(ours.GPT):
    def __init__(self, config):
        super().__init__(ours.GPTConfig(**vars(config)))

    def configure_optimizers(self, weight_decay, learning_rate, device_type):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8)

class DataLoaderLite:
    def __init__(self, B, T, process_rank, num_processes, split):
        self.B, self.T = B, T
        self.shards = sorted(os.path.join("edu_fineweb10B", s) for s in os.listdir("edu_fineweb10B") if split in s)
        self.tokens, self.pos = torch.tensor(np.load(self.shards[0]).astype(np.int64)), 0

    def next_batch(self):
        buf = self.tokens[self.pos : self.pos + self.B * self.T + 1]
        self.pos += self.B * self.T
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

def get_lr(it):
    if it < warmup_steps:
        return max_lr * (it + 1) / warmup_steps
    ratio = (it - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)

model = GPT(GPTConfig(vocab_size=50304))  # setup: replaced by the benchmark's bind()

for step in range(max_steps):
    t0 = time.time()
    last_step = step == max_steps - 1
    if step % 250 == 0 or last_step:
        raise RuntimeError("a periodic block ran")
    optimizer.zero_grad()
    loss_accum = 0.0
    for micro_step in range(grad_accum_steps):
        x, y = train_loader.next_batch()
        x, y = x.to(device), y.to(device)
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            logits, loss = model(x, y)
        loss = loss / grad_accum_steps
        loss_accum += loss.detach()
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    lr = get_lr(step)
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    optimizer.step()
    print(f"step {step:5d} | loss: {loss_accum.item():.6f} | tok/sec: {B * T * grad_accum_steps / (time.time() - t0):.2f}")
"""


def test_bng_comparison_runs_each_side_on_the_same_work(tmp_path):
    """`--bng`: build-nanogpt's loop with our allocator, as shipped, and captioner-train, each in its own process,
    reach the same final loss from the same weights, tokens and schedule; the equal-allocator ratio leads."""
    import bench_pretrain

    path = tmp_path / "train_gpt2.py"
    path.write_text(FAKE_BNG)
    bng = bench_pretrain.BuildNanoGPT(path)
    setup = bench_pretrain.TrainSetup(model="tiny", micro_batch=2, seq_len=32, accum=2, steps=1, warmup=1)
    profiles = {}
    runs = bench_pretrain.compare_bng(bng, setup, torch.device("cpu"), repeats=1, profiles=profiles)
    assert list(runs) == [bench_pretrain.BNG_EQUAL, bench_pretrain.BNG_SHIPPED, bench_pretrain.OURS]
    losses = [results[0].final_loss for results in runs.values()]
    assert losses == pytest.approx([losses[0]] * 3, abs=2e-5)
    report = bench_pretrain.format_bng(runs)
    assert report.index(f"captioner-train / {bench_pretrain.BNG_EQUAL}:") < report.index(
        f"captioner-train / {bench_pretrain.BNG_SHIPPED}:"
    )
    assert bng.printed and bng.printed[-1].startswith("step     1 | loss:")
    # the phase timers saw every phase of both loops, and account for the timed step
    assert set(profiles) == set(runs)
    for side, phases in profiles.items():
        assert all(phases[p] > 0 for p in ("forward", "backward", "clip", "optimizer")), (side, phases)
        assert sum(phases.values()) == pytest.approx(1000 * runs[side][0].step_seconds[0], rel=0.1)
