"""Test utilities: tiny generated data and composed configs for in-process runs."""

from __future__ import annotations

import csv
from pathlib import Path

from hydra import compose, initialize_config_dir

from captioner.cli.train import CONFIG_DIR

# A CLIP small enough for unit tests: 64 px, 16 px patches → 16 patches + CLS = 17 tokens of width 32.
TINY_CLIP = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=64,
    patch_size=16,
)


def compose_run(experiment: str, run_dir: Path, *overrides: str):
    """A composed root config for an in-process `train(cfg)` with its run dir pinned (no Hydra job context)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[f"experiment={experiment}", f"paths.run_dir={run_dir}", "logger=none", *overrides],
        )


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv → {metric: [(step, value), …]} skipping empty cells."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def exit_code(main, argv: list[str]) -> int:
    """A console script's exit status: what `main(argv)` returns, or the code of the SystemExit it raises."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def bare_trainer(**kwargs):
    """A one-CPU Lightning Trainer with nothing but the loop: no logger, checkpoints, progress bar, summary,
    validation or distributed sampler (the data modules split their data themselves); `kwargs` add to it."""
    import lightning as L

    quiet = dict(
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        accelerator="cpu",
        devices=1,
    )
    return L.Trainer(**{**quiet, **kwargs})
