"""GPT-2 BPE via tiktoken, usable offline.

`tiktoken.get_encoding("gpt2")` downloads its vocabulary on first use. Offline we build the same Encoding from
a local `gpt2.tiktoken` ranks file, checked against tiktoken's pinned sha256. The openai-whisper sdist on PyPI
(MIT) ships that exact file; `python -m captioner.tokenizer` fetches it from there (PyPI is reachable where the
BPE host may not be).
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from captioner.errors import UserError

EOT = 50256  # <|endoftext|>
N_VOCAB = 50257
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper==20250625"
# tiktoken's own r50k/gpt2 split pattern, so the fallback tokenises exactly like the online encoding.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bpe_path() -> Path:
    """Where the local ranks file lives: $CAPTIONER_GPT2_BPE, else the user cache."""
    if env := os.environ.get("CAPTIONER_GPT2_BPE"):
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "captioner" / "gpt2.tiktoken"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding (n_vocab 50257, `<|endoftext|>` = 50256), from the local file when present."""
    path = bpe_path()
    if path.exists():
        if (digest := _sha256(path)) != BPE_SHA256:
            raise UserError(f"{path}: sha256 {digest} is not GPT-2's ({BPE_SHA256}); delete it and re-fetch")
        ranks = load_tiktoken_bpe(str(path), expected_hash=BPE_SHA256)
        # Not a registered name, so tiktoken pickles it by value: DataLoader workers need no network either.
        return tiktoken.Encoding(
            name="gpt2_local",
            pat_str=R50K_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={"<|endoftext|>": EOT},
            explicit_n_vocab=N_VOCAB,
        )
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as err:  # network failures surface as several exception types
        raise UserError(
            f"GPT-2 BPE unavailable: tiktoken could not download it ({type(err).__name__}) and {path} does not "
            "exist. Run `python -m captioner.tokenizer` (fetches it from PyPI) or set CAPTIONER_GPT2_BPE."
        ) from err


def decode(ids) -> str:
    """Text of generated ids: EOT and the padded vocabulary's extra rows (ids >= 50257) are dropped."""
    return gpt2_encoding().decode([int(t) for t in ids if t < N_VOCAB and t != EOT]).strip()


def fetch_gpt2_bpe(dest: Path | None = None) -> Path:
    """Extract `whisper/assets/gpt2.tiktoken` from the openai-whisper sdist into `dest`, hash-checked, atomically."""
    dest = dest or bpe_path()
    if dest.exists() and _sha256(dest) == BPE_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp]
        subprocess.run([*cmd, WHISPER_SDIST], check=True)
        (sdist,) = Path(tmp).glob("openai*whisper*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()
    if (digest := hashlib.sha256(data).hexdigest()) != BPE_SHA256:
        raise UserError(f"{sdist.name}: gpt2.tiktoken sha256 {digest} != {BPE_SHA256}")
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_bytes(data)
    tmp_dest.replace(dest)
    return dest


def main() -> None:
    path = fetch_gpt2_bpe()
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    print(f"GPT-2 BPE ready: {path}")


if __name__ == "__main__":
    main()
