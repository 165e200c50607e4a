"""The command-line tools' one error boundary: a UserError is the user's to fix and prints as one line (exit 2);
anything else is a bug and keeps its traceback (exit 1), an out-of-memory error with a one-line hint before it."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from captioner.errors import UserError

OOM_HINT = (
    "out of memory: lower the micro-batch (data.batch_size / --batch-size), or use bf16 or more devices "
    "(README, 'Scaling out'); the traceback follows"
)


@contextlib.contextmanager
def error_boundary(prog: str, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Run the body; a UserError (or one of `also`, e.g. Hydra's config errors) becomes `prog: message` on
    stderr and exit 2. CAPTIONER_TRACEBACK=1 (or HYDRA_FULL_ERROR=1) shows their traceback too."""
    try:
        yield
    except (UserError, *also) as err:
        if "1" in (os.environ.get("CAPTIONER_TRACEBACK"), os.environ.get("HYDRA_FULL_ERROR")):
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            print(f"{prog}: {OOM_HINT}", file=sys.stderr)
        raise
