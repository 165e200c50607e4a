"""Lightning callbacks: metric plots, caption gallery, throughput/MFU."""

from captioner.callbacks.gallery import CaptionGalleryCallback, write_gallery
from captioner.callbacks.plots import PlotsCallback, plot_metrics
from captioner.callbacks.throughput import ThroughputCallback

__all__ = ["CaptionGalleryCallback", "PlotsCallback", "ThroughputCallback", "plot_metrics", "write_gallery"]
