"""The caption server behind `captioner-serve`: a web page at `/`, `GET /health`, `POST /caption` (multipart
field `image`, optional field `beams`) → `{"caption": …}`; every error is JSON `{"error": …}` with a 4xx/5xx
status (503 with Retry-After when `max_queue` requests are already waiting).

Starlette + uvicorn: a small, well-kept ASGI pair (routing, multipart parsing, a production HTTP server)
with no framework on top, so the whole server is this file. Concurrent requests share the model through a
`Batcher`: requests arriving within a few milliseconds of each other are captioned by one batched model call.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from dataclasses import dataclass, field

import anyio.to_thread
import torch
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from captioner.api import CaptionPipeline
from captioner.errors import UserError
from captioner.models.vision import UnreadableImage

MAX_BEAMS = 8  # beam search costs beams × the greedy work: a cap keeps one request from hogging the server
RETRY_AFTER_S = 1  # what a 503 tells an overloaded server's clients to wait
STATUS = {"missing": 400, "not_an_image": 415, "truncated": 400, "too_many_pixels": 413}


@dataclass
class Job:
    pixels: torch.Tensor  # (3, S, S)
    beams: int | None
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ServerBusy(Exception):
    """The queue is full: the request is refused (503) rather than left to wait behind a backlog."""


class Batcher:
    """One worker between the requests and the model. It takes the first waiting request, waits `wait_s` for
    others to arrive, takes up to `max_batch` in all, and captions each group with the same beam count by one
    model call in a thread (the event loop keeps accepting uploads meanwhile). One call runs at a time, so the
    model is never used from two threads; requests arriving during a call form the next batch. At most
    `max_queue` requests wait: more would only time out, so the next ones are refused (`ServerBusy`)."""

    def __init__(
        self, pipeline: CaptionPipeline, max_batch: int = 8, wait_s: float = 0.005, max_queue: int = 64
    ):
        if max_batch < 1 or max_queue < 1:
            raise UserError(f"max_batch and max_queue must be ≥ 1, got {max_batch} and {max_queue}")
        self.pipeline, self.max_batch, self.wait_s = pipeline, max_batch, wait_s
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "refused_busy": 0}

    async def submit(self, pixels: torch.Tensor, beams: int | None) -> str:
        if self.queue.full():
            raise ServerBusy()
        job = Job(pixels, beams)
        self.queue.put_nowait(job)
        return await job.future

    async def run(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            await asyncio.sleep(self.wait_s)  # let requests that arrive together join
            while len(jobs) < self.max_batch and not self.queue.empty():
                jobs.append(self.queue.get_nowait())
            groups: dict[int | None, list[Job]] = {}
            for job in jobs:
                if not job.future.done():  # done already: its client went away while it waited
                    groups.setdefault(job.beams, []).append(job)
            for beams, group in groups.items():
                await self._caption(group, beams)

    async def _caption(self, group: list[Job], beams: int | None) -> None:
        pixels = torch.stack([job.pixels for job in group])  # (B, 3, S, S)
        try:
            captions = await anyio.to_thread.run_sync(self.pipeline.caption_pixels, pixels, beams)
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
        data = await upload.read()
    name = upload.filename or "upload"
    if not data:
        return error(400, f"{name}: the uploaded file is empty")
    try:  # decoding in a thread: a large JPEG takes a while, and other requests keep arriving meanwhile
        pixels = await anyio.to_thread.run_sync(state.pipeline.preprocess, io.BytesIO(data), name)
    except UnreadableImage as err:
        return error(STATUS[err.reason], str(err))
    try:
        text = await state.batcher.submit(pixels, beams)
    except ServerBusy:  # the queue filled up while this upload was read and decoded
        return busy(state.batcher)
    except Exception as err:
        return error(500, f"captioning failed: {type(err).__name__}: {err}")
    return JSONResponse({"caption": text})


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


# The page: plain HTML + a few lines of script; relative URLs, so it also works behind a proxy's sub-path.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>captioner</title>
<style>
  :root { --ink: #1d2433; --muted: #667085; --line: #d0d5dd; --accent: #2f6fed; --bad: #b42318; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
         background: #f6f7f9; }
  main { max-width: 760px; margin: 0 auto; padding: 32px 20px; }
  h1 { font-size: 24px; margin: 0 0 4px; }
  .sub { color: var(--muted); font-size: 14px; margin: 0 0 24px; overflow-wrap: anywhere; }
  #drop { display: flex; flex-direction: column; align-items: center; justify-content: center; gap: 8px;
          min-height: 160px; padding: 24px; border: 2px dashed var(--line); border-radius: 12px;
          background: #fff; text-align: center; cursor: pointer;
          transition: border-color .15s, background .15s; }
  #drop.over { border-color: var(--accent); background: #eef4ff; }
  #drop strong { font-size: 18px; }
  #drop span { color: var(--muted); font-size: 14px; }
  #drop .pick { color: var(--accent); text-decoration: underline; }
  .controls { display: flex; align-items: center; gap: 12px; margin: 16px 0; }
  select { font: inherit; padding: 4px 8px; border: 1px solid var(--line); border-radius: 6px;
           background: #fff; }
  #result { display: none; gap: 20px; align-items: flex-start; padding: 16px; background: #fff;
            border: 1px solid var(--line); border-radius: 12px; }
  #result.shown { display: flex; }
  #preview { width: 240px; max-height: 240px; object-fit: contain; border-radius: 8px; background: #eceef2; }
  #caption { font-size: 22px; margin: 0 0 8px; }
  #meta { color: var(--muted); font-size: 13px; }
  #error { display: none; margin: 16px 0 0; padding: 10px 14px; border-radius: 8px; color: var(--bad);
           background: #fef3f2; border: 1px solid #fecdca; }
  .busy #caption { color: var(--muted); }
</style></head>
<body><main>
<h1>captioner</h1>
<p class="sub" id="model">loading model information…</p>
<label id="drop" for="file">
  <strong>Drop an image here</strong>
  <span>or <span class="pick">choose a file</span> · or paste one</span>
</label>
<input id="file" type="file" accept="image/*" hidden>
<div class="controls">
  <label for="beams">Beams</label>
  <select id="beams"></select>
  <span id="beamhint" class="sub" style="margin:0"></span>
</div>
<div id="result"><img id="preview" alt="the image being captioned">
  <div><p id="caption"></p><div id="meta"></div></div></div>
<p id="error" role="alert"></p>
</main>
<script>
const $ = (id) => document.getElementById(id);
let current = null, maxBytes = Infinity;
for (let b = 1; b <= 8; b++) $("beams").add(new Option(b === 1 ? "1 (greedy)" : String(b), b));
$("beams").value = 3;

function showError(message) {
  $("error").textContent = message;
  $("error").style.display = message ? "block" : "none";
}

fetch("health").then((r) => r.json()).then((h) => {
  const g = h.model.generation;
  const millions = (h.model.parameters / 1e6).toFixed(1);
  $("model").textContent = `${h.model.source} · ${h.model.device} · ${millions}M parameters`;
  $("beams").value = g.method === "beam" ? Math.min(g.num_beams || 3, 8) : 1;
  const fallback = g.method === "beam" ? `${g.num_beams || 3} beams` : g.method;
  $("beamhint").textContent = `model default: ${fallback}`;
  maxBytes = h.max_upload_bytes;
}).catch(() => { $("model").textContent = "model information unavailable"; });

async function run() {
  if (!current) return;
  showError("");
  if (current.size > maxBytes) {
    showError(`${current.name} is larger than the server's limit of ${(maxBytes / 2 ** 20).toFixed(1)} MiB`);
    return;
  }
  const body = new FormData();
  body.append("image", current);
  body.append("beams", $("beams").value);
  $("result").classList.add("shown", "busy");
  $("caption").textContent = "captioning…";
  $("meta").textContent = "";
  const started = performance.now();
  try {
    const response = await fetch("caption", { method: "POST", body });
    const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    $("caption").textContent = answer.caption || "(empty caption)";
    $("meta").textContent = `${$("beams").value} beam(s) · ${Math.round(performance.now() - started)} ms`;
  } catch (err) {
    $("result").classList.remove("shown");  // the error says it all; a half-filled card would not
    showError(err.message);
  } finally {
    $("result").classList.remove("busy");
  }
}

function choose(file) {
  if (!file) return;
  current = file;
  $("preview").src = URL.createObjectURL(file);
  run();
}

$("file").addEventListener("change", (e) => {
  choose(e.target.files[0]);
  e.target.value = "";  // picking the same file again still fires "change"
});
$("beams").addEventListener("change", run);
const drop = $("drop");
const highlight = (on) => (e) => { e.preventDefault(); drop.classList.toggle("over", on); };
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, highlight(true)));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, highlight(false)));
drop.addEventListener("drop", (e) => choose(e.dataTransfer.files[0]));
document.addEventListener("paste", (e) => {
  choose([...e.clipboardData.files].find((f) => f.type.startsWith("image/")));
});
</script>
</body></html>
"""
