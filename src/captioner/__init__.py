"""captioner: GPT-2 that reads images. `captioner.load(PATH)` gives a CaptionPipeline (see `captioner.api`).

`load` is imported on first use, so that `import captioner.tokenizer` (and every other light module) does not
pay for torch, transformers and the models.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from captioner.api import CaptionPipeline, load

__all__ = ["CaptionPipeline", "load"]


def __getattr__(name: str):
    if name in __all__:
        from captioner import api

        return getattr(api, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
