"""download() and check_zip() against the quirks of real hosts, reproduced by a loopback server: gzip replies,
416 and 206 answers without Content-Range, short transfers; MD5 + CRC in one pass over a zip."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import threading
import zipfile

import numpy as np
import pytest

from captioner.errors import UserError
from captioner.prepare import download as dl

DATA = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()  # several 64 KiB chunks
TEXT = b'{"ctx": "a man", "endings": ["a", "b", "c", "d"], "label": 0}\n' * 3000  # compresses well


class QuirkyServer:
    """Serves one file at /f with Range support, and the quirks a test asks for:

    gzip_mode: "never", "accepted" (when Accept-Encoding allows it, as GitHub's raw host may), "always", or "br"
    (labels the reply brotli-encoded);
    bare_416: a Range past the end gets a 416 without Content-Range; bare_206: this many Range answers (or
    any answer, with `bare_206_always`) are a 206 without Content-Range; cut: this many answers announce the
    whole remainder, send half of it and hang up. `requests` records (method, Range, Accept-Encoding).
    """

    def __init__(self, data, *, gzip_mode="never", bare_416=False, bare_206=0, bare_206_always=False, cut=0):
        self.data, self.requests, self.encoding, self.bare_416 = data, [], gzip_mode, bare_416
        self.bare_206, self.bare_206_always, self.cut = bare_206, bare_206_always, cut
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                server.requests.append(
                    ("HEAD", self.headers.get("Range"), self.headers.get("Accept-Encoding"))
                )
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.data)))
                self.end_headers()

            def do_GET(self):
                rng, enc = self.headers.get("Range"), self.headers.get("Accept-Encoding") or ""
                server.requests.append(("GET", rng, enc))
                body, start = server.data, 0
                if server.encoding == "br":  # a coding urllib3 cannot decode without the brotli package
                    self.send_response(200)
                    self.send_header("Content-Encoding", "br")
                elif server.encoding == "always" or (server.encoding == "accepted" and "gzip" in enc):
                    self.send_response(200)  # a gzipping host answers the whole file, whatever the Range
                    body = gzip.compress(body)
                    self.send_header("Content-Encoding", "gzip")
                elif server.bare_206_always or (rng and server.bare_206):
                    server.bare_206 -= 1
                    start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
                    body = body[start:]
                    self.send_response(206)
                elif rng:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        if not server.bare_416:
                            self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                    body = body[start:]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut:
                    server.cut -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/f"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_asks_for_the_identity_encoding(tmp_path):
    with QuirkyServer(TEXT, gzip_mode="accepted") as server:
        path = dl.download(server.url, tmp_path / "f.jsonl", retries=0)
    assert path.read_bytes() == TEXT
    assert [enc for _, _, enc in server.requests] == ["identity"]


@pytest.mark.parametrize("cut", [0, 1])
def test_a_reply_gzipped_anyway_is_decoded_and_checked_on_its_wire_bytes(tmp_path, cut):
    # cut=1: the first reply breaks off; its decoded bytes are a prefix of the file, and the retry, answered
    # with the whole gzip stream again, starts over instead of appending to it.
    with QuirkyServer(TEXT, gzip_mode="always", cut=cut) as server:
        path = dl.download(server.url, tmp_path / "f.jsonl", retries=1)
    assert path.read_bytes() == TEXT
    assert len(server.requests) == 1 + cut


def test_a_coding_that_cannot_be_decoded_is_refused_not_saved(tmp_path):
    with QuirkyServer(TEXT, gzip_mode="br") as server, pytest.raises(dl.DownloadError, match="br-encoded"):
        dl.download(server.url, tmp_path / "f.jsonl", retries=0)
    assert not list(tmp_path.iterdir())


def test_a_complete_part_answered_416_without_content_range_is_kept(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(DATA)  # a run that died between the last byte and the rename
    with QuirkyServer(DATA, bare_416=True) as server:
        path = dl.download(server.url, tmp_path / "f.bin", retries=0)
    assert path.read_bytes() == DATA
    assert [(m, r) for m, r, _ in server.requests] == [("GET", f"bytes={len(DATA)}-"), ("HEAD", None)]


def test_a_part_longer_than_the_file_is_restarted(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(DATA + b"extra")
    with QuirkyServer(DATA, bare_416=True) as server:
        path = dl.download(server.url, tmp_path / "f.bin", retries=1)
    assert path.read_bytes() == DATA
    assert [(m, r) for m, r, _ in server.requests][-1] == ("GET", None)


def test_a_206_without_content_range_restarts_from_byte_0(tmp_path):
    (tmp_path / "f.bin.part").write_bytes(DATA[:1000])
    with QuirkyServer(DATA, bare_206=1) as server:
        path = dl.download(server.url, tmp_path / "f.bin", retries=1)
    assert path.read_bytes() == DATA
    assert [r for _, r, _ in server.requests] == ["bytes=1000-", None]


def test_giving_up_says_whether_the_part_is_kept(tmp_path):
    with QuirkyServer(DATA, cut=9) as server, pytest.raises(dl.DownloadError) as err:
        dl.download(server.url, tmp_path / "a.bin", retries=1)
    part = tmp_path / "a.bin.part"
    assert part.stat().st_size > 0 and f"{part} ({part.stat().st_size:,} bytes) is kept" in str(err.value)

    with QuirkyServer(DATA, bare_206_always=True) as server, pytest.raises(dl.DownloadError) as err:
        dl.download(server.url, tmp_path / "b.bin", retries=1)
    assert not (tmp_path / "b.bin.part").exists() and "nothing is kept" in str(err.value)
    assert isinstance(err.value, UserError)


# --- one pass: MD5 and CRCs --------------------------------------------------------------------------------


class _Unseekable(io.RawIOBase):
    """A write-only stream: zipfile then writes a data descriptor after each member (bytes it never reads)."""

    def __init__(self):
        self.buf = io.BytesIO()

    def writable(self):
        return True

    def write(self, b):
        return self.buf.write(b)


def _zip(tmp_path, *, compression, streamed: bool):
    members = {f"d/{i}.bin": DATA[i * 22_000 : i * 22_000 + 20_000 + i] for i in range(8)}
    members["d/empty"] = b""
    out = _Unseekable() if streamed else io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    path = tmp_path / "x.zip"
    path.write_bytes(out.buf.getvalue() if streamed else out.getvalue())
    return path


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_check_zip_hashes_while_checking_crcs_reading_the_file_once(
    tmp_path, monkeypatch, compression, streamed
):
    path = _zip(tmp_path, compression=compression, streamed=streamed)
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    read = []

    class Counting(io.FileIO):
        def read(self, n=-1):
            data = super().read(n)
            read.append(len(data))
            return data

    monkeypatch.setattr(dl, "open", lambda p, mode: Counting(p, "r"), raising=False)
    dl.check_zip(path, md5=md5)
    size = path.stat().st_size
    # Everything once, plus the end of the file again (zipfile reads the central directory first).
    assert size <= sum(read) < size + 2_000
    with pytest.raises(UserError, match=rf"x\.zip: MD5 {md5}, but the published MD5 of x\.zip is 0+$"):
        dl.check_zip(path, md5="0" * 32)


def test_check_zip_names_the_member_that_fails_its_crc(tmp_path):
    path = _zip(tmp_path, compression=zipfile.ZIP_STORED, streamed=False)
    raw = bytearray(path.read_bytes())
    raw[raw.index(DATA[22_000:22_100]) + 50] ^= 0xFF  # inside member d/1.bin
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"member 'd/1\.bin' fails its CRC check"):
        dl.check_zip(path, md5=hashlib.md5(raw).hexdigest())
