"""Download each item's MAIN image named in Amazon Reviews 2023 metadata into ``OUT/PARENT_ASIN.jpg``.

Bounded concurrency (a thread pool fed a few tasks ahead, so the meta file is streamed), a timeout per
request, retries with exponential backoff on 5xx, 429, timeouts and connection errors (never on other
4xx), resume (an existing file that decodes is kept), verification that each download decodes as an
image (PIL ``verify`` then ``load``), atomic writes (temp + rename) and a JSON report of every item not
fetched, ``OUT/fetch_report.json``. Only http(s) URLs are followed.
"""

import http.client
import io
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from perpeft.engine.data.amazon import JsonLines
from perpeft.engine.data.sources import id_problem
from perpeft.engine.errors import InputError
from perpeft.engine.runtime.atomic import atomic_write_bytes, atomic_write_json

REPORT = "fetch_report.json"
MAX_IMAGE_BYTES = 50 * 2**20
URL_PREFERENCE = ("large", "hi_res", "thumb")
_USER_AGENT = "perpeft-engine (image fetch)"


@dataclass(frozen=True)
class FetchSettings:
    """Concurrency, per-request timeout (s), retries after the first attempt and the first backoff (s)."""

    workers: int = 8
    timeout: float = 10.0
    retries: int = 3
    backoff: float = 0.5


@dataclass(frozen=True)
class Outcome:
    """What happened to one item: ``status`` is downloaded, present or failed."""

    item: str
    url: str
    status: str
    attempts: int = 0
    reason: str = ""


def main_image_url(record: dict[str, Any]) -> str | None:
    """The first MAIN image's ``large`` URL, else its ``hi_res``, else its ``thumb``; None when there is none."""
    images = record.get("images")
    for image in images if isinstance(images, list) else []:
        if isinstance(image, dict) and image.get("variant") == "MAIN":
            for key in URL_PREFERENCE:
                if isinstance(image.get(key), str) and image[key]:
                    return image[key]
    return None


def image_problem(data: bytes) -> str | None:
    """Why ``data`` is not a decodable image (PIL verify, then a full load), or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"not a decodable image ({' '.join(str(error).split()) or type(error).__name__})"
    return None


def fetch_images(
    meta: Path,
    out: Path,
    settings: FetchSettings = FetchSettings(),
    items: set[str] | None = None,
    skip_bad_lines: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Fetch the MAIN image of every item in ``meta`` (only those in ``items`` when given); return the report.

    The report (also written to ``out/fetch_report.json``) counts items downloaded, already present,
    failed, without a MAIN image URL and (with ``items``) listed but not in ``meta``, and meta lines
    skipped; it lists every failure with its URL, reason and attempts, and every item without URL.
    """
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    lines = JsonLines(meta, skip_bad_lines, False, "meta")
    no_url: list[str] = []
    seen: set[str] = set()
    duplicates = 0

    def tasks() -> Iterator[tuple[str, str]]:
        nonlocal duplicates
        for number, record in lines:
            item = record.get("parent_asin")
            problem = id_problem("parent_asin", item)
            if problem:
                lines.reject(number, problem)
                continue
            assert isinstance(item, str)  # for the type checker: id_problem passes only strings
            if item in seen:
                duplicates += 1
            elif items is None or item in items:
                seen.add(item)
                url = main_image_url(record)
                if url is None:
                    no_url.append(item)
                else:
                    yield item, url

    outcomes: list[Outcome] = []
    with tqdm(desc="images", unit="img", disable=not progress) as bar:
        for outcome in _run_bounded(tasks(), out, settings):
            outcomes.append(outcome)
            bar.update()
    failures = sorted((o for o in outcomes if o.status == "failed"), key=lambda o: o.item)
    report = {
        "meta": str(meta),
        "downloaded": sum(o.status == "downloaded" for o in outcomes),
        "present": sum(o.status == "present" for o in outcomes),
        "failed": len(failures),
        "without_url": len(no_url),
        "not_in_meta": len(items - seen) if items is not None else 0,
        "meta_lines_malformed": lines.malformed,
        "meta_lines_invalid": lines.invalid,
        "meta_records_duplicate": duplicates,
        "failures": [{"item": o.item, "url": o.url, "reason": o.reason, "attempts": o.attempts} for o in failures],
        "items_without_url": sorted(no_url),
        "items_not_in_meta": sorted(items - seen) if items is not None else [],
    }
    atomic_write_json(out / REPORT, report)
    return report


def read_item_list(path: Path) -> set[str]:
    """Item ids, one a line (blank lines ignored), e.g. a prepared dataset's ``missing_images.txt``."""
    try:
        return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the item list ({error})") from error


def _run_bounded(tasks: Iterator[tuple[str, str]], out: Path, settings: FetchSettings) -> Iterator[Outcome]:
    """Outcomes as they finish, with at most 4 tasks per worker in flight (the rest not yet read)."""
    with ThreadPoolExecutor(settings.workers) as pool:
        pending: set[Future[Outcome]] = set()
        for item, url in tasks:
            if len(pending) >= 4 * settings.workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (future.result() for future in done)
            pending.add(pool.submit(_fetch_one, item, url, out / f"{item}.jpg", settings))
        for future in wait(pending).done:
            yield future.result()


def _fetch_one(item: str, url: str, path: Path, settings: FetchSettings) -> Outcome:
    if path.is_file() and image_problem(path.read_bytes()) is None:
        return Outcome(item, url, "present")
    if not url.startswith(("http://", "https://")):
        return Outcome(item, url, "failed", 0, "not an http(s) URL")
    attempt = 0
    while True:
        attempt += 1
        data, reason, retry = _get(url, settings.timeout)
        if data is not None:
            reason = image_problem(data)
            if reason is None:
                atomic_write_bytes(path, data)
                return Outcome(item, url, "downloaded", attempt)
        if not retry or attempt > settings.retries:
            return Outcome(item, url, "failed", attempt, reason or "")
        time.sleep(settings.backoff * 2 ** (attempt - 1))


def _get(url: str, timeout: float) -> tuple[bytes | None, str | None, bool]:
    """The body, or None with the reason and whether a retry may help."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_IMAGE_BYTES + 1)
            unread = response.length  # bytes the Content-Length promised but the connection did not deliver
    except urllib.error.HTTPError as error:
        error.close()
        return None, f"HTTP {error.code}", error.code >= 500 or error.code == 429
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", None) or error
        return None, f"{type(error).__name__}: {reason}", True
    except ValueError as error:
        return None, f"bad URL ({error})", False
    if len(data) > MAX_IMAGE_BYTES:
        return None, f"larger than {MAX_IMAGE_BYTES} bytes", False
    if unread:
        return None, f"connection closed {unread} bytes before the end of the body", True
    return data, None, False
