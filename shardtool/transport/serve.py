"""HTTP server for a shard folder: the manifest, its shards and torrents, and the web-seed layout.

Only names the manifest lists are served, looked up in a table built from the manifest (never by joining
a request path onto the folder), so no encoding of `..` can reach a file outside the folder; nor can a
symbolic link: a listed name that resolves outside the folder is refused (404) with a warning. Each shard is
served at `/<shard>` and at `/<torrent name>/<shard>`, the path a BitTorrent client asks a BEP 19 web
seed for when the torrent has several files. aiohttp's FileResponse does Range, HEAD, conditional
requests and sendfile; the table is rebuilt when manifest.json changes (e.g. after `shardtool torrent`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from pathlib import Path

from aiohttp import hdrs, web

from ..errors import ShardtoolError
from ..manifest import MANIFEST_NAME, Manifest, load
from .paths import default_torrent_name, torrent_name

log = logging.getLogger(__name__)

ACCESS_LOG_FORMAT = '%a "%r" %s %b %{Range}i %Tf'


class _PlainFileResponse(web.FileResponse):
    """A FileResponse without content negotiation.

    aiohttp would otherwise answer a client that accepts gzip with a `<name>.gz` file lying beside the
    requested one: other bytes than the manifest names.
    """

    async def prepare(self, request: web.BaseRequest):
        headers = request.headers.copy()
        headers.popall(hdrs.ACCEPT_ENCODING, None)
        return await super().prepare(request.clone(headers=headers))


def routes_for(manifest: Manifest, directory: Path) -> dict[str, Path]:
    """URL path -> file, for everything a server of `directory` may hand out."""
    table = {f"/{MANIFEST_NAME}": directory / MANIFEST_NAME}
    for split, shards in manifest.splits.items():
        names = {torrent_name(manifest, split), default_torrent_name(manifest.dataset, split)}
        for shard in shards.shards:
            path = directory / shard.name
            table[f"/{shard.name}"] = path
            for name in names:
                table[f"/{name}/{shard.name}"] = path
    for info in manifest.sources.torrents.values():
        table[f"/{info.file}"] = directory / info.file
    return table


class _Routes:
    """The route table, rebuilt when manifest.json is replaced."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.manifest_path = directory / MANIFEST_NAME
        self.manifest = load(self.manifest_path)
        self.stamp = self._stamp()
        self.table = routes_for(self.manifest, directory)

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.manifest_path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def lookup(self, path: str) -> Path | None:
        stamp = self._stamp()
        if stamp != self.stamp and stamp is not None:
            self.stamp = stamp
            try:
                self.manifest = load(self.manifest_path)
                self.table = routes_for(self.manifest, self.directory)
                log.info("%s changed: now serving %d files", self.manifest_path, len(self.table))
            except ShardtoolError as e:
                log.warning("keeping the previous manifest: %s", e)
        return self.table.get(path)


class ShardServer:
    """Serve a shard folder over HTTP from a background thread; usable in-process and by the CLI.

    >>> with ShardServer("shards/imagenet") as server:
    ...     print(server.url)  # http://127.0.0.1:PORT/
    """

    def __init__(self, directory: str | os.PathLike, host: str = "127.0.0.1", port: int = 0):
        self.directory = Path(directory)
        self.host = host
        self.port = port
        self._routes = _Routes(self.directory)  # fails early, with the manifest's own message
        self._root = os.path.realpath(self.directory)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def manifest(self) -> Manifest:
        return self._routes.manifest

    @property
    def url(self) -> str:
        """The base URL to hand out (shard URL = url + shard name)."""
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = self._routes.lookup(request.path)
        if path is None or not self._inside(path):
            raise web.HTTPNotFound()
        return _PlainFileResponse(path, chunk_size=1 << 18)

    def _inside(self, path: Path) -> bool:
        """Whether `path`, links followed, is a file of the served folder itself."""
        real = os.path.realpath(path)
        if os.path.dirname(real) == self._root:
            return True
        log.warning("not serving %s: it leads outside %s (to %s)", path, self.directory, real)
        return False

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            return socket.create_server((self.host, self.port), family=family, backlog=1024)
        except OSError as e:
            raise ShardtoolError(f"cannot listen on {self.host}:{self.port} ({e.strerror or e})") from None

    def start(self) -> ShardServer:
        """Bind and serve in a daemon thread; returns when the server accepts connections."""
        sock = self._bind()
        self.port = sock.getsockname()[1]
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(
            app, access_log=log, access_log_format=ACCESS_LOG_FORMAT, shutdown_timeout=1.0
        )
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.SockSite(self._runner, sock, backlog=1024).start())
        self._thread = threading.Thread(target=self._loop.run_forever, name="shard-server", daemon=True)
        self._thread.start()
        log.info("serving %s at %s", self.directory, self.url)
        return self

    def stop(self) -> None:
        """Close the listening socket and open connections, then end the thread."""
        if self._loop is None:
            return
        loop, self._loop = self._loop, None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=30)
        loop.close()

    def __enter__(self) -> ShardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
