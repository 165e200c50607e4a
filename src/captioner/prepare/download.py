"""Resumable, verified downloads: what every `captioner-prepare` source that comes over HTTP shares."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import requests
from urllib3.response import HTTPResponse

from captioner.errors import UserError

log = logging.getLogger(__name__)

# Byte ranges and Content-Length count the bytes on the wire: only an unencoded reply lets them count the file's.
IDENTITY = {"Accept-Encoding": "identity"}


class DownloadError(UserError, OSError):
    """A transfer ended short or inconsistent; its message says whether a `.part` file is kept to resume."""


RETRYABLE = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    DownloadError,
)


def progress_bar(*columns):
    """A rich progress bar on stderr: stdout carries only what a command prints as its result."""
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, console=Console(stderr=True))


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
                raise DownloadError(
                    f"{url}: giving up after {retries + 1} attempts ({err}); {_what_is_kept(part)}"
                ) from err
            log.warning("%s: %s; resuming (attempt %d of %d)", url, err, attempt + 2, retries + 1)
    os.replace(part, dest)
    return dest


def _what_is_kept(part: Path) -> str:
    if part.exists():
        return f"{part} ({part.stat().st_size:,} bytes) is kept, re-run to resume"
    return "nothing is kept, a re-run starts over"


def _encoding(resp: requests.Response) -> str | None:
    """The content coding (gzip, ...) the server applied although we asked for the identity, or None."""
    coding = resp.headers.get("Content-Encoding", "").strip().lower()
    return None if coding in ("", "identity") else coding


def _fetch_into(url: str, part: Path, *, chunk_size: int, timeout: float) -> None:
    """One HTTP request that appends to (or restarts) `part`; raises DownloadError if it ends short.

    `part` always holds a prefix of the file itself: a reply the server gzipped anyway is decoded as it arrives,
    its size checked on the wire bytes, and never appended to a part (its byte ranges count gzip bytes).
    """
    from rich.progress import BarColumn, DownloadColumn, TransferSpeedColumn

    have = part.stat().st_size if part.exists() else 0
    headers = IDENTITY | ({"Range": f"bytes={have}-"} if have else {})
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        # 416 Range Not Satisfiable: the part is already whole, or longer than the remote file.
        if resp.status_code == 416:
            _accept_whole(url, part, have, resp, timeout)
            return
        resp.raise_for_status()
        encoding = _encoding(resp)
        if encoding and any(c.strip() not in HTTPResponse.CONTENT_DECODERS for c in encoding.split(",")):
            raise DownloadError(
                f"{url}: the server sent it {encoding}-encoded, which urllib3 cannot decode here"
            )
        if resp.status_code == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start is None or encoding:
                part.unlink(missing_ok=True)  # nothing tells where (in the file) these bytes belong
                why = f"{encoding}-encoded" if encoding else "without a Content-Range"
                raise DownloadError(f"{url}: partial content {why}; restarting from byte 0")
            if start != have:
                raise DownloadError(
                    f"{url}: asked to resume at byte {have}, server answered from byte {start}"
                )
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
        with open(part, mode) as f, progress_bar(*columns) as progress:
            task = progress.add_task(Path(part.name).stem, total=None if encoding else total, completed=have)
            for chunk in resp.iter_content(chunk_size=chunk_size):
                f.write(chunk)
                progress.advance(task, len(chunk))
        if encoding:
            wire = resp.raw.tell()  # bytes read off the socket, before decoding
            if total is not None and wire != total:
                raise DownloadError(
                    f"{url}: got {wire} {encoding}-encoded bytes, the server announced {total}"
                )
            return
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
        raise DownloadError(f"{url}: {part} has {size} bytes, the server announced {total}")


def _accept_whole(url: str, part: Path, have: int, resp: requests.Response, timeout: float) -> None:
    """After a 416: return if `part` is the whole file, else delete it and raise DownloadError (a retry restarts).

    A 416 need not say the remote size (`Content-Range: bytes */SIZE`); without it a HEAD request's headers may.
    """
    total = _content_range(resp.headers.get("Content-Range", ""))[1]
    if total is None:
        head = requests.head(url, headers=IDENTITY, allow_redirects=True, timeout=timeout)
        if head.ok and not _encoding(head) and "Content-Length" in head.headers:
            total = int(head.headers["Content-Length"])
    if total == have:
        return
    part.unlink()
    raise DownloadError(f"{url}: {part} ({have} bytes) does not fit the remote size {total}; restarting")


def _content_range(value: str) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header ("bytes 0-99/1234", "bytes */1234"); None where
    the header does not say."""
    first = re.match(r"\s*bytes\s+(\d+)-\d+/", value)
    total = re.search(r"/(\d+)\s*$", value)
    return (int(first.group(1)) if first else None), (int(total.group(1)) if total else None)


class _HashingReader:
    """A read-only binary file that feeds an MD5 every byte read at or just past the bytes hashed so far.

    zipfile reads an archive's central directory (at the end), then every member front to back, so checking
    the CRCs through this reader hashes nearly all of the file on the way: one pass for both checks.
    """

    GAP = 1 << 16  # a skip this small (a data descriptor zipfile does not read) is read and hashed at once

    def __init__(self, f: BinaryIO, advance):
        self._f, self._advance = f, advance
        self.md5, self.hashed = hashlib.md5(), 0

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:
        at = self._f.tell()
        if self.hashed < at <= self.hashed + self.GAP:
            self._f.seek(self.hashed)
            self._hash(self._f.read(at - self.hashed))
        data = self._f.read(n)
        if at <= self.hashed < at + len(data):
            self._hash(memoryview(data)[self.hashed - at :])
        return data

    def _hash(self, data) -> None:
        self.md5.update(data)
        self.hashed += len(data)
        self._advance(len(data))

    def hexdigest(self) -> str:
        """The MD5 of the whole file: what the reads have not covered (the central directory) is read now."""
        self._f.seek(self.hashed)
        while self.read(1 << 20):
            pass
        return self.md5.hexdigest()


def check_zip(path: str | Path, md5: str | None = None) -> None:
    """Read every member of a zip and check its CRC and, given `md5`, the whole file's MD5, in one pass with a
    progress bar; UserError naming the file (and member) if any check fails."""
    from rich.progress import BarColumn, DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

    path = Path(path)
    columns = (
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with open(path, "rb") as f, progress_bar(*columns) as progress:
        task = progress.add_task(f"verify {path.name}", total=path.stat().st_size)
        reader = _HashingReader(f, lambda n: progress.advance(task, n))
        try:
            with zipfile.ZipFile(reader) as zf:  # type: ignore[arg-type]  (a file-like object)
                bad = zf.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError) as err:
            raise UserError(f"{path}: corrupt zip ({err})") from err
        if bad is not None:
            raise UserError(f"{path}: corrupt zip, member {bad!r} fails its CRC check")
        digest = reader.hexdigest() if md5 else None
    if md5 and digest != md5.lower():
        raise UserError(f"{path}: MD5 {digest}, but the published MD5 of {path.name} is {md5}")
