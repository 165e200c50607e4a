"""Lightning callbacks: checkpoints, throughput/MFU, plots, the caption gallery + wandb table, text samples."""
