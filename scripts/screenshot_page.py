"""Screenshots of `captioner-serve`'s page in headless Chromium, to look at: the page after captioning an image
(`<out>/page_captioned.png`) and while pointing at one of the caption's words, its attention map over the preview
(`<out>/page_hover.png`).

    python scripts/screenshot_page.py CKPT_OR_DIR IMAGE [--out DIR] [--word WORD]

It starts `captioner-serve --model CKPT_OR_DIR` on a free port, opens the page as a user would, uploads IMAGE
through the page's own file input and moves the mouse onto WORD (default: the caption's longest word, in a
shapes-world caption its shape). Chromium is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe), so nothing but the standard library is needed. Without a chromium on PATH (or
--chromium) it installs Debian's: `apt-get update && apt-get install -y chromium` (root needed).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CAPTION_TIMEOUT_S = 120  # a first caption on a loaded CPU includes the model's warm-up


def find_chromium(given: str | None) -> str:
    """The browser to drive: `given`, else chromium on PATH, else Debian's package, installed now."""
    if given:
        return given
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    print("screenshot_page: no chromium on PATH; apt-get install -y chromium", file=sys.stderr)
    subprocess.run(["apt-get", "update"], check=True)
    subprocess.run(["apt-get", "install", "-y", "chromium"], check=True)
    return shutil.which("chromium") or sys.exit("screenshot_page: chromium did not install")


class Chromium:
    """Headless Chromium and one tab, driven by DevTools protocol commands: JSON messages, each ended by a NUL
    byte, written to the browser's fd 3 and read from its fd 4 (--remote-debugging-pipe)."""

    def __init__(self, executable: str, width: int, height: int):
        self.profile = tempfile.TemporaryDirectory()
        to_browser, self.commands = os.pipe()
        self.replies, from_browser = os.pipe()

        def pipe_fds():  # in the child: the pipe ends on the fds Chromium reads (3) and writes (4)
            read, write = (
                fcntl.fcntl(to_browser, fcntl.F_DUPFD, 10),
                fcntl.fcntl(from_browser, fcntl.F_DUPFD, 10),
            )
            os.dup2(read, 3)
            os.dup2(write, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"]
        self.process = subprocess.Popen(
            [executable, *flags, "--remote-debugging-pipe", f"--user-data-dir={self.profile.name}"],
            preexec_fn=pipe_fds,
            pass_fds=(3, 4),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self.buffer, self.next_id, self.session = b"", 0, None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def send(self, method: str, **params) -> dict:
        """One command's result (to the tab once attached); the events arriving meanwhile are not needed."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self, timeout_s: float = 60) -> dict:
        while b"\0" not in self.buffer:
            if not select.select([self.replies], [], [], timeout_s)[0]:
                raise TimeoutError(f"chromium sent nothing for {timeout_s} s")
            chunk = os.read(self.replies, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited ({self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout_s: float = CAPTION_TIMEOUT_S):
        """The value of `expression` once it is truthy, polled."""
        deadline = time.monotonic() + timeout_s
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {what}")
            time.sleep(0.1)
        return value

    def screenshot(self, dest: Path) -> Path:
        dest.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return dest

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self.commands)
        os.close(self.replies)
        self.profile.cleanup()


@contextlib.contextmanager
def serving(model: str) -> Iterator[str]:
    """`captioner-serve --model MODEL` on a free port; its URL (uvicorn logs the port it got)."""
    serve = Path(sys.executable).parent / "captioner-serve"
    process = subprocess.Popen(
        [str(serve), "--model", model, "--port", "0"], stderr=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        for line in process.stderr:
            if "Uvicorn running on " in line:
                url = line.split("Uvicorn running on ")[1].split()[0]
                break
            print(line, end="", file=sys.stderr)  # the server's own complaint, if it fails to start
        else:
            sys.exit(f"screenshot_page: captioner-serve exited with {process.wait()}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


WORDS = """[...document.querySelectorAll("#caption .word")].map((w) => {
  const r = w.getBoundingClientRect();
  return [w.textContent, r.x + r.width / 2, r.y + r.height / 2];
})"""


def shoot(browser: Chromium, url: str, image: Path, out: Path, word: str | None) -> list[Path]:
    """Upload `image` through the page's file input, then point at `word`: the two screenshots."""
    browser.send("Page.enable")
    browser.send("Page.navigate", url=url)
    browser.wait_for('document.readyState === "complete" && !!document.getElementById("file")', "the page")
    root = browser.send("DOM.getDocument")["root"]["nodeId"]
    file_input = browser.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
    browser.send("DOM.setFileInputFiles", files=[str(image.resolve())], nodeId=file_input)  # fires "change"
    words = browser.wait_for(
        f'document.getElementById("preview").complete && ({WORDS}).length && {WORDS}', "a caption"
    )
    browser.wait_for('!document.getElementById("model").textContent.endsWith("…")', "the model line")
    shots = [browser.screenshot(out / "page_captioned.png")]
    text, x, y = next((w for w in words if w[0] == word), None) or max(words, key=lambda w: len(w[0]))
    browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    browser.wait_for('getComputedStyle(document.getElementById("heat")).display === "block"', "a map")
    shots.append(browser.screenshot(out / "page_hover.png"))
    print(f"caption: {' '.join(w[0] for w in words)}; pointing at {text!r}")
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="screenshot_page.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a caption checkpoint (.ckpt) or exported directory")
    parser.add_argument("image", type=Path, help="the image to upload")
    parser.add_argument("--out", type=Path, default=Path("outputs/screenshots"))
    parser.add_argument("--word", default=None, help="the word to point at (default: the longest)")
    parser.add_argument("--chromium", default=None, help="the browser (default: chromium on PATH, installed)")
    parser.add_argument("--size", default="900x720", help="the window, WIDTHxHEIGHT")
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"no such image: {args.image}")
    width, height = map(int, args.size.split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    browser = Chromium(find_chromium(args.chromium), width, height)
    try:
        with serving(args.model) as url:
            for shot in shoot(browser, f"{url}/", args.image, args.out, args.word):
                print(shot)
    finally:
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
