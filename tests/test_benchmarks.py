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
