"""`fetch_images` against a local HTTP server: good, corrupt, 404, flaky 500 and slow responses."""

import io
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from perpeft.engine.data import fetch
from perpeft.engine.data.fetch import REPORT, FetchSettings, fetch_images, main_image_url

FAST = FetchSettings(workers=4, timeout=0.4, retries=2, backoff=0.01)


def jpeg(colour: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


class Server:
    """A local image server: ``/good/*`` images, ``/corrupt``, ``/missing`` (404), ``/flaky/N/*`` (500 for the
    first N requests of that path, then an image), ``/slow`` (answers after 2 s), ``/short`` (a body shorter
    than its Content-Length). Counts requests per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server.lock:
                    server.hits[self.path] += 1
                    hits = server.hits[self.path]
                if self.path.startswith("/good/"):
                    self.reply(200, jpeg())
                elif self.path == "/corrupt":
                    self.reply(200, b"\xff\xd8\xff\xe0 this is not really a jpeg")
                elif self.path.startswith("/flaky/"):
                    failures = int(self.path.split("/")[2])
                    self.reply(500, b"busy") if hits <= failures else self.reply(200, jpeg())
                elif self.path == "/slow":
                    time.sleep(2)
                    self.reply(200, jpeg())
                elif self.path == "/short":
                    self.send_response(200)
                    self.send_header("Content-Length", "5000")
                    self.end_headers()
                    self.wfile.write(jpeg()[:100])
                    self.close_connection = True
                else:
                    self.reply(404, b"no such image")

            def reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # the slow handler writes to a client that gave up

        self.http = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"


@pytest.fixture
def server() -> Iterator[Server]:
    serving = Server()
    thread = threading.Thread(target=serving.http.serve_forever, daemon=True)
    thread.start()
    try:
        yield serving
    finally:
        serving.http.shutdown()
        serving.http.server_close()
        thread.join(timeout=5)


def record(item: str, large: str | None, hi_res: str | None = None, thumb: str | None = None, variant="MAIN") -> dict:
    return {"parent_asin": item, "images": [{"large": large, "hi_res": hi_res, "thumb": thumb, "variant": variant}]}


def write_meta(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def decodes(path: Path) -> bool:
    with Image.open(path) as image:
        image.load()
    return True


def test_main_image_url_prefers_large_then_hi_res_then_thumb() -> None:
    other = {"large": "l/other", "variant": "PT01"}
    assert main_image_url({"images": [other, record("x", "l", "h", "t")["images"][0]]}) == "l"
    assert main_image_url(record("x", None, "h", "t")) == "h"
    assert main_image_url(record("x", "", None, "t")) == "t"
    assert main_image_url(record("x", "l", variant="PT01")) is None
    assert main_image_url({"images": None}) is None


def test_fetch_good_corrupt_missing_flaky_slow_and_resume(server: Server, tmp_path: Path) -> None:
    url = server.url
    records = [
        record("GOOD", f"{url}/good/1"),
        record("FALLBACK", None, f"{url}/good/2"),
        record("CORRUPT", f"{url}/corrupt"),
        record("MISSING", f"{url}/missing"),
        record("FLAKY", f"{url}/flaky/2/a"),  # 500 twice, then OK: within 2 retries
        record("DOWN", f"{url}/flaky/9/b"),  # 500 every time: gives up after 3 attempts
        record("SLOW", f"{url}/slow"),
        record("SHORT", f"{url}/short"),
        record("NOURL", None, variant="PT01"),
        record("LOCAL", "file:///etc/hostname"),
        record("PRESENT", f"{url}/good/present"),
        record("STALE", f"{url}/good/stale"),
        record("GOOD", f"{url}/good/duplicate"),  # a second record of GOOD: ignored
    ]
    meta = write_meta(tmp_path / "meta.jsonl", records)
    out = tmp_path / "images"
    out.mkdir()
    (out / "PRESENT.jpg").write_bytes(jpeg((1, 2, 3)))
    (out / "STALE.jpg").write_bytes(b"half a download")

    started = time.monotonic()
    report = fetch_images(meta, out, FAST)
    assert time.monotonic() - started < 8

    assert (report["downloaded"], report["present"], report["failed"], report["without_url"]) == (4, 1, 6, 1)
    assert report["meta_records_duplicate"] == 1
    assert {p.name for p in out.glob("*.jpg")} == {
        f"{i}.jpg" for i in ("GOOD", "FALLBACK", "FLAKY", "PRESENT", "STALE")
    }
    assert all(decodes(path) for path in out.glob("*.jpg"))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary left behind
    failures = {f["item"]: (f["reason"], f["attempts"]) for f in report["failures"]}
    assert failures["CORRUPT"][0].startswith("not a decodable image") and failures["CORRUPT"][1] == 1
    assert failures["MISSING"] == ("HTTP 404", 1)
    assert failures["DOWN"] == ("HTTP 500", 3)
    assert failures["SLOW"][1] == 3 and "timed out" in failures["SLOW"][0]
    assert failures["SHORT"][1] == 3 and "before the end of the body" in failures["SHORT"][0]
    assert failures["LOCAL"] == ("not an http(s) URL", 0)
    assert report["items_without_url"] == ["NOURL"]
    assert server.hits["/flaky/2/a"] == 3 and server.hits["/missing"] == 1
    assert server.hits["/good/present"] == 0 and server.hits["/good/stale"] == 1 and server.hits["/good/duplicate"] == 0
    assert json.loads((out / REPORT).read_text()) == report

    # Resume: everything fetched is kept, only what failed is asked for again.
    server.hits.clear()
    again = fetch_images(
        meta, out, FetchSettings(workers=2, timeout=0.2, retries=0, backoff=0.0), items={"GOOD", "DOWN", "GONE"}
    )
    assert (again["present"], again["failed"], again["not_in_meta"], again["items_not_in_meta"]) == (1, 1, 1, ["GONE"])
    assert dict(server.hits) == {"/flaky/9/b": 1}


def test_backoff_doubles_between_attempts(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(fetch, "time", SimpleNamespace(sleep=waits.append))
    meta = write_meta(tmp_path / "meta.jsonl", [record("DOWN", f"{server.url}/flaky/9/c")])
    report = fetch_images(meta, tmp_path / "images", FetchSettings(workers=1, timeout=1, retries=3, backoff=0.25))
    assert report["failures"][0]["attempts"] == 4 and waits == [0.25, 0.5, 1.0]
