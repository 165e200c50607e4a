"""captioner-prepare coco: resumable download, zip checks, atomic extraction, existing copies."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data.coco_format import load_captions
from captioner.errors import UserError
from captioner.prepare import coco
from tests.data.test_captions import make_caption_root


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2017, 9, 1, 0, 0, 0)), data)  # same bytes each time
    return buf.getvalue()


def coco_zips(src: Path) -> dict[str, bytes]:
    """The three COCO 2017 archives, small, from a fixture root holding train2017/val2017."""
    zips = {}
    for split in ("train2017", "val2017"):
        zips[f"{split}.zip"] = _zip_bytes(
            {f"{split}/{p.name}": p.read_bytes() for p in (src / split).iterdir()}
        )
    anns = {f"annotations/{p.name}": p.read_bytes() for p in (src / "annotations").iterdir()}
    anns["annotations/instances_train2017.json"] = b"{}"  # not needed for captions: left out
    zips["annotations_trainval2017.zip"] = _zip_bytes(anns)
    return zips


class _Server:
    """A loopback HTTP server for in-memory files with Range support; it can cut its first answer short or
    ignore Range for chosen files, and records what it was asked."""

    def __init__(
        self, files: dict[str, bytes], cut_first: set[str] = frozenset(), no_range: set[str] = frozenset()
    ):
        self.files, self.cut_first, self.no_range, self.requests = files, set(cut_first), no_range, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.removeprefix("/mirror/")
                server.requests.append((name, self.headers.get("Range")))
                data = server.files[name]
                start = 0
                if self.headers.get("Range") and name not in server.no_range:
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if name in server.cut_first:  # announce everything, send half, hang up
                    server.cut_first.discard(name)
                    self.wfile.write(data[start : start + (len(data) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"


@pytest.fixture
def coco_src(tmp_path) -> Path:
    make_caption_root(tmp_path / "src", "train2017", 3, first_id=1)
    # Incompressible filler so train2017.zip spans several download chunks (64 KiB).
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "src" / "train2017" / "filler.png")
    return make_caption_root(tmp_path / "src", "val2017", 2, first_id=101)


def _serve(zips: dict[str, bytes], monkeypatch, **quirks) -> _Server:
    """A mirror of COCO's layout holding these zips, whose MD5s stand in for the published ones."""
    for name, data in zips.items():
        monkeypatch.setitem(coco.COCO_MD5, name, hashlib.md5(data).hexdigest())
    return _Server({coco.COCO_PATHS[name]: data for name, data in zips.items()}, **quirks)


def test_prepare_downloads_resumes_verifies_and_extracts(tmp_path, coco_src, monkeypatch):
    zips = coco_zips(coco_src)
    root = tmp_path / "coco"
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / "val2017.zip.part").write_bytes(zips["val2017.zip"][:100])  # an earlier partial run
    stale = (
        b"X" * 50
    )  # a partial the server cannot resume (ignores Range): must be restarted, not appended to
    (root / "downloads" / "annotations_trainval2017.zip.part").write_bytes(stale)
    quirks = dict(cut_first={"zips/train2017.zip"}, no_range={"annotations/annotations_trainval2017.zip"})
    with _serve(zips, monkeypatch, **quirks) as server:
        coco.prepare_coco(root, base_url=server.base_url)
        assert ("zips/val2017.zip", "bytes=100-") in server.requests
        # The first answer broke off half-way: the retry resumed from what had been written.
        first, retry = [r for n, r in server.requests if n == "zips/train2017.zip"]
        assert (
            first is None
            and 0 < int(retry.removeprefix("bytes=").rstrip("-")) <= len(zips["train2017.zip"]) // 2
        )
        expected = [coco.DONE_MARKER, *(p.name for p in (coco_src / "train2017").iterdir())]
        assert sorted(p.name for p in (root / "train2017").iterdir()) == sorted(expected)
        assert (root / "val2017" / "000000000101.jpg").read_bytes() == (
            coco_src / "val2017" / "000000000101.jpg"
        ).read_bytes()
        assert sorted(p.name for p in (root / "annotations").iterdir() if not p.name.startswith(".")) == [
            "captions_train2017.json",
            "captions_val2017.json",
        ]
        assert not list((root / "downloads").iterdir())  # zips deleted after extraction
        assert len(load_captions(root, "val2017").captions) == 6
        n_requests = len(server.requests)
        coco.prepare_coco(root, base_url=server.base_url)  # everything is done: no requests
        assert len(server.requests) == n_requests


def test_prepare_detects_a_corrupt_zip(tmp_path, coco_src, monkeypatch):
    zips = coco_zips(coco_src)
    member = (coco_src / "val2017" / "000000000102.png").read_bytes()
    at = zips["val2017.zip"].index(member) + len(member) // 2
    zips["val2017.zip"] = (
        zips["val2017.zip"][:at] + bytes([zips["val2017.zip"][at] ^ 0xFF]) + zips["val2017.zip"][at + 1 :]
    )
    root = tmp_path / "coco"
    with (
        _serve(zips, monkeypatch) as server,
        pytest.raises(ValueError, match=r"val2017\.zip: corrupt zip, member 'val2017/000000000102\.png'"),
    ):
        coco.prepare_coco(root, base_url=server.base_url)
    assert not (root / "downloads" / "val2017.zip").exists()  # deleted so a re-run downloads it again
    assert not (root / "val2017").exists() and (root / "train2017" / coco.DONE_MARKER).exists()


def test_a_zip_that_is_not_the_published_one_is_deleted(tmp_path, coco_src, monkeypatch):
    zips = coco_zips(coco_src)
    root = tmp_path / "coco"
    with _serve(zips, monkeypatch) as server:
        monkeypatch.setitem(coco.COCO_MD5, "train2017.zip", "0" * 32)  # its CRCs are fine, its MD5 is not
        with pytest.raises(
            UserError, match=r"train2017\.zip: MD5 [0-9a-f]{32}, but the published MD5 .* is 0+;"
        ):
            coco.prepare_coco(root, base_url=server.base_url)
    assert not (root / "downloads" / "train2017.zip").exists() and not (root / "train2017").exists()


def test_prepare_from_an_existing_copy(tmp_path, coco_src, monkeypatch):
    # any download attempt would fail
    monkeypatch.setattr(coco, "BASE_URL", "http://127.0.0.1:9/nothing")
    zips = coco_zips(coco_src)
    for name, data in zips.items():
        monkeypatch.setitem(coco.COCO_MD5, name, hashlib.md5(data).hexdigest())
    extracted = tmp_path / "extracted"
    coco.prepare_coco(extracted, source=coco_src)
    assert (extracted / "train2017").is_symlink() and (extracted / "annotations").is_symlink()
    assert len(load_captions(extracted, "train2017").image_ids) == 3

    zipped = tmp_path / "zips"
    zipped.mkdir()
    for name, data in zips.items():
        (zipped / name).write_bytes(data)
    root = tmp_path / "from_zips"
    coco.prepare_coco(root, source=zipped)
    assert not (root / "val2017").is_symlink() and (root / "val2017" / "000000000102.png").is_file()
    assert (zipped / "val2017.zip").is_file()  # the source copy is left alone
    with pytest.raises(UserError, match=r"train2017\.zip"):
        coco.prepare_coco(tmp_path / "other", source=tmp_path / "empty")
