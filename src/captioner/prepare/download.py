"""Resumable, verified downloads: what every `captioner-prepare` source that comes over HTTP shares."""

from __future__ import annotations

import logging
import os
import re
import zipfile
import zlib
from pathlib import Path

import requests

from captioner.errors import UserError

log = logging.getLogger(__name__)


class DownloadError(UserError, OSError):
    """A transfer ended short or inconsistent; the `.part` file is kept so that a retry resumes it."""


RETRYABLE = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    DownloadError,
)


def download(
    url: str, dest: str | Path, *, retries: int = 3, chunk_size: int = 1 << 16, timeout: float = 60
) -> Path:
    """Download `url` to `dest` and return `dest`; a `dest` already there is taken as complete.

    Bytes go to `dest.part`, which survives failures: each retry (and each later call) resumes it with an HTTP
    Range request. The final size must equal the size the server announced; only then is the part file renamed
    onto `dest`.
    """
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, chunk_size=chunk_size, timeout=timeout)
            break
        except RETRYABLE as err:
            if attempt == retries:
                message = (
                    f"{url}: giving up after {retries + 1} attempts ({err}); {part} is kept, re-run to resume"
                )
                raise DownloadError(message) from err
            log.warning("%s: %s; resuming (attempt %d of %d)", url, err, attempt + 2, retries + 1)
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, *, chunk_size: int, timeout: float) -> None:
    """One HTTP request that appends to (or restarts) `part`; raises DownloadError if it ends short."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        # 416 Range Not Satisfiable: the part is already whole, or longer than the remote file.
        if resp.status_code == 416:
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            if total == have:
                return
            part.unlink()
            raise DownloadError(
                f"{url}: {part} ({have} bytes) does not fit the remote size {total}; restarting"
            )
        resp.raise_for_status()
        if resp.status_code == 206:
            start = int(re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", "bytes 0-")).group(1))
            if start != have:
                raise DownloadError(
                    f"{url}: asked to resume at byte {have}, server answered from byte {start}"
                )
            total = _content_range_total(resp.headers["Content-Range"])
            mode = "ab"
        else:  # 200: the server ignored the Range header, so start over
            have, mode = 0, "wb"
            total = int(resp.headers["Content-Length"]) if "Content-Length" in resp.headers else None
        columns = (
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
        )
        with open(part, mode) as f, Progress(*columns) as progress:
            task = progress.add_task(Path(part.name).stem, total=total, completed=have)
            for chunk in resp.iter_content(chunk_size=chunk_size):
                f.write(chunk)
                progress.advance(task, len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise DownloadError(f"{url}: {part} has {size} bytes, the server announced {total}")


def _content_range_total(value: str) -> int | None:
    """The total size from a Content-Range header ("bytes 0-99/1234" or "bytes */1234")."""
    match = re.search(r"/(\d+)\s*$", value)
    return int(match.group(1)) if match else None


def check_zip(path: str | Path) -> None:
    """Read every member of a zip and check its CRC; ValueError naming the file (and member) if any fails."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise UserError(f"{path}: corrupt zip ({err})") from err
    if bad is not None:
        raise UserError(f"{path}: corrupt zip, member {bad!r} fails its CRC check")
