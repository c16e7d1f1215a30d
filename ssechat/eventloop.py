"""The event loop ssechat's servers run on: uvloop, letting in a burst of connections at once.

libuv, the engine of uvloop, accepts one connection each time the listening socket
is reported readable, that is one per turn of the loop (libuv/libuv#3696, since
libuv 1.45). A loop streaming to many clients turns every few milliseconds, so a
burst of new connections waits in the kernel's accept queue and comes in one per
turn: a hundred chat clients that post their messages and open their answers'
streams at once (each a new connection) waited up to 0.4 s here for the server to
take them, and an answer's tokens waited with them. SSE sees such bursts often:
every client reconnects after a deploy or a network blip.

:class:`Loop` is uvloop's loop with a ``create_server`` that accepts every
pending connection (up to ``ACCEPT_BATCH``; ``SHARED_ACCEPT_BATCH`` on a socket
that other processes may share) each time, as asyncio's own loop does, and
hands each to uvloop (``connect_accepted_socket``): the connections
themselves are uvloop's, as fast as ever. TLS servers, and options this does
not handle, get uvloop's own server.

Run uvicorn on it with ``--loop ssechat.eventloop:new_event_loop`` (``manage.py
runserver`` does).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import uvloop

__all__ = ["ACCEPT_BATCH", "SHARED_ACCEPT_BATCH", "Loop", "new_event_loop"]

logger = logging.getLogger("ssechat.eventloop")

ACCEPT_BATCH = 256  # connections taken each time the listening socket is readable
# ... when the socket was handed in (``sock=``): uvicorn's ``--workers`` processes share
# one listening socket, and one that took a whole burst would hold all its streams
# for their lifetime. A few per turn: a busier worker turns slower, so the others
# take more of a burst.
SHARED_ACCEPT_BATCH = 16
# Out of file descriptors (or memory): the kernel keeps the connections queued, and
# accepting stops for this long instead of spinning on the error (as asyncio does).
ACCEPT_RETRY_DELAY = 1.0
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


def new_event_loop() -> Loop:
    """A new :class:`Loop` (what uvicorn's ``--loop`` option wants)."""
    return Loop()


class Loop(uvloop.Loop):
    """uvloop, whose TCP servers accept connections in batches (see the module doc)."""

    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        host: str | Iterable[str] | None = None,
        port: int | None = None,
        *,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: Any = None,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
        start_serving: bool = True,
        **options: Any,
    ) -> asyncio.AbstractServer:
        if ssl is not None or options or (sock is not None and sock.family == socket.AF_UNIX):
            return await super().create_server(
                protocol_factory, host, port, sock=sock, backlog=backlog, ssl=ssl,
                reuse_address=reuse_address, reuse_port=reuse_port,
                start_serving=start_serving, **options,
            )  # fmt: skip
        if sock is not None:
            if host is not None or port is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            sock.setblocking(False)
            sockets, batch = [sock], SHARED_ACCEPT_BATCH
        else:
            sockets = await self._bind(host, port, reuse_address, reuse_port)
            batch = SHARED_ACCEPT_BATCH if reuse_port else ACCEPT_BATCH
        server = BatchAcceptServer(self, sockets, protocol_factory, backlog, batch)
        if start_serving:
            server.start_listening()
            await asyncio.sleep(0)  # as asyncio does: serving starts before we return
        return server

    async def _bind(
        self,
        host: str | Iterable[str] | None,
        port: int | None,
        reuse_address: bool | None,
        reuse_port: bool | None,
    ) -> list[socket.socket]:
        """Listening sockets for ``host`` (one per address it resolves to) and ``port``,
        bound as asyncio binds them."""
        hosts: list[str | None]
        if host is None or host == "":
            hosts = [None]
        elif isinstance(host, str):
            hosts = [host]
        else:
            hosts = list(host)
        infos = set()
        for name in hosts:
            found = await self.getaddrinfo(
                name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            infos.update(found)
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned an empty list")
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in sorted(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                if reuse_address is not False:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    # IPv6 on its own socket: the IPv4 address has its own.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(
                        exc.errno, f"error while attempting to bind on address {address!r}: "
                        f"{(exc.strerror or '').lower()}",
                    ) from None  # fmt: skip
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets


class BatchAcceptServer(asyncio.AbstractServer):
    """A TCP server of :class:`Loop`: the listening sockets are read by the loop, and
    each time one is readable every pending connection (up to ``batch``) is accepted
    and handed to uvloop."""

    def __init__(
        self,
        loop: Loop,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        backlog: int,
        batch: int = ACCEPT_BATCH,
    ) -> None:
        self._loop = loop
        self._batch = batch
        self._sockets: list[socket.socket] | None = sockets
        self._protocol_factory = protocol_factory
        self._backlog = backlog
        self._listening = False
        self._closed = asyncio.Event()
        self._opening: set[asyncio.Task] = set()  # connections being handed to uvloop

    # -- asyncio.AbstractServer ---------------------------------------------------

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets or ())

    def is_serving(self) -> bool:
        return self._listening

    def close(self) -> None:
        """Stop listening and close the listening sockets (open connections stay)."""
        sockets, self._sockets = self._sockets, None
        if sockets is None:
            return
        if self._listening:
            for sock in sockets:
                self._loop.remove_reader(sock.fileno())
        self._listening = False
        for sock in sockets:
            sock.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def start_serving(self) -> None:
        self.start_listening()
        await asyncio.sleep(0)

    async def serve_forever(self) -> None:
        if self._sockets is None:
            raise RuntimeError(f"server {self!r} is closed")
        self.start_listening()
        try:
            await self._closed.wait()
        finally:
            self.close()

    # -- accepting --------------------------------------------------------------------

    def start_listening(self) -> None:
        if self._listening or self._sockets is None:
            return
        self._listening = True
        for sock in self._sockets:
            sock.listen(self._backlog)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self._batch):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # every pending connection is in
            except ConnectionAbortedError:
                continue  # gone before we took it
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                self._loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": exc,
                        "socket": sock,
                    }
                )
                self._loop.remove_reader(sock.fileno())
                self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume, sock)
                return
            conn.setblocking(False)
            task = self._loop.create_task(self._open(conn))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    def _resume(self, sock: socket.socket) -> None:
        if self._listening and self._sockets is not None and sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    async def _open(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._protocol_factory, conn)
        except Exception:
            logger.exception("could not open an accepted connection")
            conn.close()
