"""The caption server on a real socket: the page, /health, /caption answering as the API does,
attention maps with attention=1 (the same caption), concurrent requests batched onto the model (grouped by beam
count and attention), every kind of bad upload refused with a
4xx JSON message while the server keeps serving, the `captioner-serve` command itself, and (where chromium
exists) the page in a browser."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

import captioner
from captioner.cli.serve import main
from captioner.models.vision import open_image
from captioner.server import create_app
from tests.helpers import exit_code
from tests.test_api import bomb_png, image_bytes, noise_image, write_checkpoint

MAX_UPLOAD = 100_000
CHROMIUM = "/usr/bin/chromium"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("model") / "last.ckpt")


@pytest.fixture(scope="module")
def pipeline(ckpt):
    return captioner.load(ckpt, device="cpu")


@contextlib.contextmanager
def serving(app):
    """`app` on a free localhost port, uvicorn in a thread (the socket is bound here: no port race)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def url(pipeline):
    with serving(create_app(pipeline, max_batch=8, max_upload_bytes=MAX_UPLOAD)) as url:
        yield url


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def upload(data: bytes, name: str = "photo.png", kind: str = "image/png") -> dict:
    return {"image": (name, data, kind)}


PNG = image_bytes(noise_image(0))


def decoded(data: bytes):
    return open_image(io.BytesIO(data))


def served(client) -> dict:
    return client.get("/health").json()["served"]


def test_the_page_and_health(client, ckpt):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for part in ('id="drop"', 'type="file"', 'id="beams"', 'id="preview"', 'id="heat"', 'id="caption"'):
        assert part in page.text
    assert 'id="error"' in page.text and 'body.append("attention", "1")' in page.text
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8 and health["max_upload_bytes"] == MAX_UPLOAD
    assert health["model"]["source"] == str(ckpt) and health["model"]["device"] == "cpu"
    assert health["model"]["generation"] == {"method": "greedy", "max_new_tokens": 8}
    assert set(health["served"]) == {"requests", "batches", "largest_batch", "refused_busy"}
    assert health["max_queue"] == 64 and health["queued"] == 0


def test_a_caption_is_what_the_api_says(client, pipeline):
    jpeg = image_bytes(noise_image(1), "JPEG")
    for data, name, beams in ((PNG, "a.png", None), (jpeg, "b.jpg", None), (PNG, "a.png", 3), (jpeg, "b", 1)):
        fields = {} if beams is None else {"beams": str(beams)}
        response = client.post("/caption", files=upload(data, name), data=fields)
        assert response.status_code == 200, response.text
        assert response.json() == {"caption": pipeline.caption(decoded(data), beams=beams)[0]}


def test_attention_1_adds_a_map_per_token_to_the_same_caption(client, pipeline):
    for beams in ("", "2"):
        plain = client.post("/caption", files=upload(PNG), data={"beams": beams, "attention": "0"})
        mapped = client.post("/caption", files=upload(PNG), data={"beams": beams, "attention": "1"})
        assert plain.status_code == mapped.status_code == 200, (plain.text, mapped.text)
        answer = mapped.json()
        assert set(answer) == {"caption", "tokens", "attention", "cls"}
        assert plain.json() == {"caption": answer["caption"]}
        (expected,) = pipeline.caption(decoded(PNG), beams=int(beams) if beams else None, attention=True)
        assert answer["caption"] == expected["caption"] and answer["tokens"] == expected["tokens"]
        grids = np.array(answer["attention"])  # (T, H, W): the tiny CLIP's 4 x 4 patches
        assert grids.shape == (len(answer["tokens"]), 4, 4) and len(answer["cls"]) == len(grids)
        assert np.allclose(grids, expected["attention"], atol=1e-6)


async def post_all(
    url: str, jobs: list[tuple[bytes, int | None]], attention: str = ""
) -> list[httpx.Response]:
    """Concurrent requests; `attention`: the field for all of them, or "mixed" for 0 and 1 by turns."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/caption",
                    files=upload(data),
                    data={
                        **({} if beams is None else {"beams": str(beams)}),
                        "attention": str(i % 2) if attention == "mixed" else attention,
                    },
                )
                for i, (data, beams) in enumerate(jobs)
            )
        )


def test_concurrent_requests_are_batched_and_grouped_by_beams(client, url, pipeline):
    images = [image_bytes(noise_image(seed)) for seed in range(8)]
    before = served(client)
    responses = asyncio.run(post_all(url, [(data, None) for data in images]))
    after = served(client)
    assert [r.status_code for r in responses] == [200] * 8
    assert [r.json()["caption"] for r in responses] == [pipeline.caption(decoded(d))[0] for d in images]
    assert after["requests"] - before["requests"] == 8
    batches = after["batches"] - before["batches"]
    assert batches < 8 and after["largest_batch"] > 1, f"8 concurrent requests took {batches} model calls"

    mixed = [(data, 1 + i % 2) for i, data in enumerate(images)]  # greedy and 2 beams, interleaved
    responses = asyncio.run(post_all(url, mixed))
    assert [r.json()["caption"] for r in responses] == [
        pipeline.caption(decoded(d), beams=b)[0] for d, b in mixed
    ]
    assert served(client)["batches"] - after["batches"] >= 2  # a batch decodes with one beam count


def test_requests_with_and_without_attention_are_captioned_apart_and_alike(client, url, pipeline):
    images = [image_bytes(noise_image(seed)) for seed in range(6)]
    before = served(client)
    responses = asyncio.run(post_all(url, [(data, None) for data in images], attention="mixed"))
    answers = [r.json() for r in responses]
    assert [a["caption"] for a in answers] == [pipeline.caption(decoded(d))[0] for d in images]
    assert [("tokens" in a) for a in answers] == [False, True] * 3
    assert served(client)["batches"] - before["batches"] >= 2  # one model call computes maps for all or none


def chunked(body: bytes):
    """A request body without Content-Length: the server only learns its size by reading it."""
    for start in range(0, len(body), 16384):
        yield body[start : start + 16384]


def multipart(data: bytes) -> bytes:
    head = b'--B\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
    return head + b"Content-Type: image/png\r\n\r\n" + data + b"\r\n--B--\r\n"


BAD_UPLOADS = {
    "no image field": (dict(data={"other": "1"}), 400, "missing multipart form field 'image'"),
    "no body": ({}, 400, "missing multipart form field 'image'"),
    "image as text": (dict(data={"image": "cat.jpg"}), 400, "must be a file upload"),
    "empty file": (dict(files=upload(b"")), 400, "empty"),
    "two files": (dict(files=[("image", ("a.png", PNG)), ("image", ("b.png", PNG))]), 400, "Too many files"),
    "not an image": (dict(files=upload(b"%PDF-1.4 hello", "doc.pdf")), 415, "doc.pdf: not an image"),
    "truncated": (dict(files=upload(PNG[: len(PNG) // 2], "cut.png")), 400, "cut.png: corrupt or truncated"),
    "too large": (dict(files=upload(b"\0" * 2 * MAX_UPLOAD)), 413, "larger than the limit"),
    "too large, chunked": (
        dict(
            content=chunked(multipart(b"\0" * 3 * MAX_UPLOAD)),
            headers={"content-type": "multipart/form-data; boundary=B"},
        ),
        413,
        "larger than the limit",
    ),
    "bomb (PIL warns)": (dict(files=upload(bomb_png(12_000), "bomb.png")), 413, "bomb.png: too many pixels"),
    "bomb (PIL raises)": (dict(files=upload(bomb_png(20_000), "bomb.png")), 413, "bomb.png: too many pixels"),
    "beams not a number": (
        dict(files=upload(PNG), data={"beams": "many"}),
        400,
        "beams must be a whole number",
    ),
    "beams 0": (dict(files=upload(PNG), data={"beams": "0"}), 400, "beams must be a whole number"),
    "beams too many": (dict(files=upload(PNG), data={"beams": "9"}), 400, "from 1 \\(greedy\\) to 8"),
    "attention yes": (dict(files=upload(PNG), data={"attention": "yes"}), 400, "attention must be 0 or 1"),
    "attention with a space": (dict(files=upload(PNG), data={"attention": " 1"}), 400, "got ' 1'"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_a_bad_upload_gets_a_4xx_json_message_and_the_server_keeps_serving(client, case):
    request, status, message = BAD_UPLOADS[case]
    response = client.post("/caption", **request)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert re.search(message, response.json()["error"]), response.json()
    good = client.post("/caption", files=upload(PNG))
    assert good.status_code == 200 and "caption" in good.json()


class GatedPipeline:
    """The real pipeline, each model call held until `gate` opens: the server's queue fills while one runs."""

    def __init__(self, pipeline):
        self.pipeline, self.gate, self.calls = pipeline, threading.Event(), threading.Semaphore(0)

    def info(self):
        return self.pipeline.info()

    def preprocess(self, *args):
        return self.pipeline.preprocess(*args)

    def caption_pixels(self, pixels, beams, attention):
        self.calls.release()
        assert self.gate.wait(timeout=60)
        return self.pipeline.caption_pixels(pixels, beams, attention)


def test_a_full_queue_refuses_with_503_and_retry_after_then_serves_again(pipeline):
    gated = GatedPipeline(pipeline)
    images = [image_bytes(noise_image(seed)) for seed in range(4)]
    with serving(create_app(gated, max_batch=1, max_upload_bytes=MAX_UPLOAD, max_queue=2)) as url:

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                post = lambda data: client.post("/caption", files=upload(data))  # noqa: E731
                running = asyncio.create_task(post(images[0]))
                assert await asyncio.to_thread(gated.calls.acquire, timeout=30)  # the model call began
                waiting = [asyncio.create_task(post(d)) for d in images[1:3]]
                deadline = time.monotonic() + 30
                while (await client.get("/health")).json()["queued"] < 2:
                    assert time.monotonic() < deadline, "the two requests never queued"
                    await asyncio.sleep(0.01)
                refused = await post(images[3])  # answered at once, while the model call still runs
                gated.gate.set()
                done = await asyncio.gather(running, *waiting)
                return refused, done, await post(images[3]), (await client.get("/health")).json()

        refused, done, retried, health = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "server busy: 2 requests are already waiting" in refused.json()["error"]
    assert [r.json()["caption"] for r in done] == [pipeline.caption(decoded(d))[0] for d in images[:3]]
    assert retried.status_code == 200 and retried.json()["caption"] == pipeline.caption(decoded(images[3]))[0]
    assert health["served"]["refused_busy"] == 1 and health["max_queue"] == 2 and health["queued"] == 0


def test_other_methods_and_paths_answer_json(client):
    assert client.get("/caption").status_code == 405
    missing = client.get("/nothing-here")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}


def test_captioner_serve_serves_and_reports_a_bad_model_in_one_line(ckpt, tmp_path, capsys):
    assert exit_code(main, ["--model", str(tmp_path / "missing.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "checkpoint not found" in err and "missing.ckpt" in err

    command = [str(Path(sys.executable).parent / "captioner-serve"), "--model", str(ckpt), "--port", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([*command, "--max-batch", "3"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        for line in process.stderr:  # uvicorn logs the port it got
            if "Uvicorn running on " in line:
                url = line.split("Uvicorn running on ")[1].split()[0]
                break
        else:
            pytest.fail(f"captioner-serve exited with {process.wait()}")
        with httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/health").json()["max_batch"] == 3
            assert client.post("/caption", files=upload(PNG)).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no browser at {CHROMIUM}")
def test_the_page_captions_an_upload_and_overlays_a_words_map_in_a_browser(
    url, ckpt, pipeline, tmp_path, monkeypatch
):
    """Headless chromium, driven as scripts/screenshot_page.py drives it: the page fills in the model line from
    /health, captions an image picked in its file input as word spans, and pointing at a word draws its map
    over the centre square of the preview."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.delitem(sys.modules, "screenshot_page", raising=False)
    from screenshot_page import Chromium, shoot

    image = tmp_path / "photo.png"
    image.write_bytes(PNG)  # 96 x 72: shown 240 x 180, its centre square 180 px wide, 30 px from the left
    browser = Chromium(CHROMIUM, 900, 720)
    try:
        shots = shoot(browser, f"{url}/", image, tmp_path, word=None)
        page = browser.evaluate(
            """(() => {
              const heat = document.getElementById("heat"), box = heat.getBoundingClientRect();
              return {model: document.getElementById("model").textContent,
                      words: document.querySelectorAll("#caption .word").length,
                      on: document.querySelector(".word.on").textContent,
                      heat: ["left", "top", "width", "height"].map((k) => heat.style[k]).join(" "),
                      box: [box.x, box.y]};
            })()"""
        )
    finally:
        browser.close()
    expected = pipeline.caption(decoded(PNG), attention=True)[0]
    assert str(ckpt) in page["model"] and page["words"] == len(expected["tokens"])
    assert page["on"] == max((t.lstrip() for t in expected["tokens"]), key=len)  # the word pointed at
    assert page["heat"] == "30px 0px 180px 180px"
    before, after = (np.asarray(Image.open(shot).convert("RGB"), dtype=int) for shot in shots)
    changed = np.abs(before - after).sum(-1) > 30  # (720, 900): where pointing at the word changed the page
    x, y = map(round, page["box"])
    assert changed[y : y + 180, x : x + 180].mean() > 0.5  # the map, over the centre square
    changed[y : y + 180, x : x + 180] = False
    assert not changed[:, : x + 180].any()  # nothing else left of the caption (the word's highlight is in it)
