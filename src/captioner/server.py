"""The caption server behind `captioner-serve`: a web page at `/` (page.html), `GET /health`, `POST /caption`
(multipart field `image`, optional fields `beams` and `attention`) → `{"caption": …}`, with `attention=1` also
`"tokens"`, `"attention"` (a [H][W] grid over CLIP's centre square per token) and `"cls"`, as
`CaptionPipeline.caption(attention=True)` documents; every error is JSON `{"error": …}` with a 4xx/5xx status
(503 with Retry-After when `max_queue` requests are already waiting).

Starlette + uvicorn: a small, well-kept ASGI pair (routing, multipart parsing, a production HTTP server)
with no framework on top, so the whole server is this file and its page. Concurrent requests share the model through a
`Batcher`: requests arriving within a few milliseconds of each other are captioned by one batched model call.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from dataclasses import dataclass, field
from importlib import resources

import anyio.to_thread
import torch
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from captioner.api import Captioned, CaptionPipeline
from captioner.errors import UserError
from captioner.models.vision import UnreadableImage

MAX_BEAMS = 8  # beam search costs beams × the greedy work: a cap keeps one request from hogging the server
RETRY_AFTER_S = 1  # what a 503 tells an overloaded server's clients to wait
STATUS = {"missing": 400, "not_an_image": 415, "truncated": 400, "too_many_pixels": 413}
PAGE = resources.files("captioner").joinpath("page.html").read_text(encoding="utf-8")


@dataclass
class Job:
    pixels: torch.Tensor  # (3, S, S)
    beams: int | None
    attention: bool
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ServerBusy(Exception):
    """The queue is full: the request is refused (503) rather than left to wait behind a backlog."""


class Batcher:
    """One worker between the requests and the model. It takes the first waiting request, waits `wait_s` for
    others to arrive, takes up to `max_batch` in all, and captions each group with the same beam count and
    attention setting by one model call in a thread, so a request's caption is what it would be alone; the
    event loop keeps accepting uploads meanwhile. One call runs at a time, so the model is never used from two
    threads; requests arriving during a call form the next batch. At most
    `max_queue` requests wait: more would only time out, so the next ones are refused (`ServerBusy`)."""

    def __init__(
        self, pipeline: CaptionPipeline, max_batch: int = 8, wait_s: float = 0.005, max_queue: int = 64
    ):
        if max_batch < 1 or max_queue < 1:
            raise UserError(f"max_batch and max_queue must be ≥ 1, got {max_batch} and {max_queue}")
        self.pipeline, self.max_batch, self.wait_s = pipeline, max_batch, wait_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "refused_busy": 0}

    async def submit(self, pixels: torch.Tensor, beams: int | None, attention: bool = False) -> Captioned:
        if self.queue.full():
            raise ServerBusy()
        job = Job(pixels, beams, attention)
        self.queue.put_nowait(job)
        return await job.future

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            await asyncio.sleep(self.wait_s)  # let requests that arrive together join
            while len(jobs) < self.max_batch and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            groups: dict[tuple[int | None, bool], list[Job]] = {}
            for job in jobs:
                if not job.future.done():  # done already: its client went away while it waited
                    groups.setdefault((job.beams, job.attention), []).append(job)
            for (beams, attention), group in groups.items():
                await self._caption(group, beams, attention)

    async def _caption(self, group: list[Job], beams: int | None, attention: bool) -> None:
        pixels = torch.stack([job.pixels for job in group])  # (B, 3, S, S)
        try:
            captions = await anyio.to_thread.run_sync(self.pipeline.caption_pixels, pixels, beams, attention)
        except Exception as err:  # the requests answer 500; the worker carries on
            for job in group:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        self.stats["requests"] += len(group)
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group))
        for job, caption in zip(group, captions, strict=True):
            if not job.future.done():
                job.future.set_result(caption)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def busy(batcher: Batcher) -> JSONResponse:
    """The 503 of a full queue (counted in /health's `served.refused_busy`)."""
    batcher.stats["refused_busy"] += 1
    return error(
        503,
        f"server busy: {batcher.queue.maxsize} requests are already waiting; retry in {RETRY_AFTER_S} s",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


def limited(receive, limit: int):
    """The request's receive channel, refusing the body once more than `limit` bytes have arrived: a chunked
    upload has no Content-Length, and the multipart parser would otherwise spool all of it."""
    seen = 0

    async def receive_limited():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"upload larger than the limit of {limit} bytes")
        return message

    return receive_limited


def parse_beams(value) -> int | None:
    if value is None or value == "":
        return None  # the model's saved generation settings
    try:
        beams = int(value) if isinstance(value, str) else None
    except ValueError:
        beams = None
    if beams is None or not 1 <= beams <= MAX_BEAMS:
        raise HTTPException(
            400, f"beams must be a whole number from 1 (greedy) to {MAX_BEAMS}, got {value!r}"
        )
    return beams


def parse_attention(value) -> bool:
    if value is None or value in ("", "0"):
        return False
    if value == "1":
        return True
    raise HTTPException(400, f"attention must be 0 or 1 (1 adds each token's attention map), got {value!r}")


async def caption(request: Request) -> JSONResponse:
    state = request.app.state
    if state.batcher.queue.full():  # before reading the upload: an overloaded server spends nothing on it
        return busy(state.batcher)
    limit = state.max_upload_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refuse before reading any of it
        return error(413, f"upload of {declared} bytes is larger than the limit of {limit} bytes")
    request = Request(request.scope, limited(request.receive, limit))
    async with request.form(max_files=1, max_fields=4) as form:
        upload = form.get("image")
        if upload is None:
            return error(400, "missing multipart form field 'image' (the image file)")
        if not isinstance(upload, UploadFile):
            return error(400, "form field 'image' must be a file upload, not text")
        beams = parse_beams(form.get("beams"))
        attention = parse_attention(form.get("attention"))
        data = await upload.read()
    name = upload.filename or "upload"
    if not data:
        return error(400, f"{name}: the uploaded file is empty")
    try:  # decoding in a thread: a large JPEG takes a while, and other requests keep arriving meanwhile
        pixels = await anyio.to_thread.run_sync(state.pipeline.preprocess, io.BytesIO(data), name)
    except UnreadableImage as err:
        return error(STATUS[err.reason], str(err))
    try:
        result = await state.batcher.submit(pixels, beams, attention)
    except ServerBusy:  # the queue filled up while this upload was read and decoded
        return busy(state.batcher)
    except Exception as err:
        return error(500, f"captioning failed: {type(err).__name__}: {err}")
    return JSONResponse(result if attention else {"caption": result})


async def health(request: Request) -> JSONResponse:
    state = request.app.state
    return JSONResponse(
        {
            "status": "ok",
            "model": state.info,
            "max_batch": state.batcher.max_batch,
            "max_upload_bytes": state.max_upload_bytes,
            "queued": state.batcher.queue.qsize(),
            "max_queue": state.batcher.queue.maxsize,
            "served": state.batcher.stats,
        }
    )


async def page(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


def create_app(
    pipeline: CaptionPipeline,
    max_batch: int = 8,
    max_upload_bytes: int = 10 << 20,
    batch_wait_s: float = 0.005,
    max_queue: int = 64,
) -> Starlette:
    """The ASGI app serving `pipeline` (`captioner.load`'s); run it with uvicorn (`captioner-serve` does)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        worker = asyncio.create_task(app.state.batcher.run())
        yield
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/health", health),
            Route("/caption", caption, methods=["POST"]),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.pipeline = pipeline
    app.state.info = pipeline.info()
    app.state.batcher = Batcher(pipeline, max_batch, batch_wait_s, max_queue)
    app.state.max_upload_bytes = max_upload_bytes
    return app
