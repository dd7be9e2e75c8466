"""The run a service answers from, replaced whole when `embed --add-items` publishes a catalog version.

`LiveRun.refresh` notices a new ``embeddings/catalog.json`` (another file: the writer renames it into
place), reads it and the tables it names in a thread beside the event loop, grows the serving run
(`ServingRun.with_catalog`: the index gets the new rows, nothing else is recomputed) and swaps it in on
the loop's thread. A request is prepared and answered by whichever run is current at each step; since
tables only grow, a query prepared by one version is valid in every later one. A catalog that cannot be
read is logged and the current version goes on serving.
"""

import asyncio
import logging
import os

from perpeft.engine.errors import InputError
from perpeft.engine.serve.catalog import read_catalog
from perpeft.engine.serve.recommend import ServingRun

log = logging.getLogger(__name__)

FileStamp = tuple[int, int, int] | None


def file_stamp(path: os.PathLike) -> FileStamp:
    """(inode, size, mtime) of ``path``, None when absent: a replaced file has another."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class LiveRun:
    """Holds the current `ServingRun` (``serving``) and moves it to newer catalog versions."""

    def __init__(self, serving: ServingRun) -> None:
        self.serving = serving
        self._seen = file_stamp(serving.run.embedded_catalog)

    async def refresh(self) -> bool:
        """Swap in the catalog's newest version if catalog.json changed since the last look; whether it did."""
        path = self.serving.run.embedded_catalog
        stamp = file_stamp(path)
        if stamp == self._seen:
            return False
        self._seen = stamp
        current = self.serving
        try:
            catalog = await asyncio.to_thread(read_catalog, current.run)
            if catalog.version <= current.catalog.version:
                return False
            grown = await asyncio.to_thread(current.with_catalog, catalog)
        except InputError as error:
            log.warning("catalog not loaded, still serving version %d: %s", current.catalog.version, error)
            return False
        self.serving = grown
        log.info("serving catalog version %d (%d items added)", catalog.version, len(catalog.items))
        return True

    async def watch(self, interval: float) -> None:
        """`refresh` every ``interval`` seconds, for as long as the task runs; a failure is logged and the
        next look tries again (the watcher never dies while the service answers)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("looking for a new catalog version failed")
