"""ssechat.eventloop: uvloop whose servers let a burst of connections in at once."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest
import uvloop

from ssechat.eventloop import (
    ACCEPT_RETRY_DELAY,
    SHARED_ACCEPT_BATCH,
    BatchAcceptServer,
    Loop,
    new_event_loop,
)


class Counting(asyncio.Protocol):
    made: list[Counting] = []

    def connection_made(self, transport):
        self.transport = transport
        Counting.made.append(self)

    def data_received(self, data):
        self.transport.write(data.upper())


def run(main, loop_factory=new_event_loop):
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def connect_many(port: int, count: int) -> list[socket.socket]:
    """Connections the kernel completes at once, before the server takes any."""
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def accepted_after_a_few_turns(loop_factory) -> int:
    async def main():
        Counting.made = []
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Counting, "127.0.0.1", 0, backlog=512)
        port = server.sockets[0].getsockname()[1]
        clients = connect_many(port, 60)  # all in the kernel's queue: the loop did not turn
        await turns(6)
        accepted = len(Counting.made)
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()
        return accepted

    return run(main, loop_factory)


def test_a_burst_of_connections_is_taken_in_one_turn():
    assert accepted_after_a_few_turns(new_event_loop) == 60
    # uvloop's own server takes one a turn (libuv#3696): what this loop is for.
    assert accepted_after_a_few_turns(uvloop.new_event_loop) < 60


def test_a_shared_socket_is_taken_a_few_connections_a_turn():
    """A socket handed in may be shared by uvicorn's worker processes: each takes a
    few connections a turn (a busier worker turns slower), not a whole burst."""

    async def main():
        Counting.made = []
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = await loop.create_server(Counting, sock=sock, backlog=512)
        total = 5 * SHARED_ACCEPT_BATCH
        clients = connect_many(sock.getsockname()[1], total)
        await turns(3)  # a connection is made two turns after its accept
        early = len(Counting.made)
        await turns(20)
        assert 0 < early < total
        assert len(Counting.made) == total
        for client in clients:
            client.close()
        server.close()

    run(main)


def test_accepted_connections_are_uvloops_and_work():
    async def main():
        loop = asyncio.get_running_loop()
        assert isinstance(loop, Loop)
        server = await loop.create_server(Counting, "127.0.0.1", 0)
        assert isinstance(server, BatchAcceptServer) and server.is_serving()
        assert server.get_loop() is loop
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"HELLO"
        transport = Counting.made[-1].transport
        assert type(transport).__module__.startswith("uvloop")
        sock = transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        server.close()
        server.close()  # twice is fine
        await server.wait_closed()
        assert not server.is_serving() and server.sockets == ()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main)


def test_a_given_socket_and_deferred_serving():
    async def main():
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = await loop.create_server(Counting, sock=sock, start_serving=False)
        assert not server.is_serving() and server.sockets == (sock,)
        await server.start_serving()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"X"
        writer.close()
        with pytest.raises(ValueError):
            await loop.create_server(Counting, "127.0.0.1", 1, sock=sock)
        serving = asyncio.ensure_future(server.serve_forever())
        await turns(2)
        server.close()
        await serving
        assert sock.fileno() == -1  # closed with the server

    run(main)


def test_binding_like_asyncio():
    async def main():
        loop = asyncio.get_running_loop()
        first = await loop.create_server(Counting, "127.0.0.1", 0)
        port = first.sockets[0].getsockname()[1]
        with pytest.raises(OSError) as taken:
            await loop.create_server(Counting, "127.0.0.1", port)
        assert taken.value.errno == errno.EADDRINUSE
        assert "127.0.0.1" in str(taken.value)
        first.close()
        # Several hosts: a socket each.
        both = await loop.create_server(Counting, ["127.0.0.1", "localhost"], 0, reuse_port=True)
        assert len(both.sockets) >= 1
        both.close()
        await both.wait_closed()

    run(main)


def test_out_of_descriptors_pauses_accepting_then_resumes():
    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda _, context: errors.append(context["exception"]))
        server = await loop.create_server(Counting, "127.0.0.1", 0)
        sock = server.sockets[0]

        class Exhausted:
            def __init__(self, real):
                self.real = real

            def fileno(self):
                return self.real.fileno()

            def accept(self):
                raise OSError(errno.EMFILE, "Too many open files")

        Counting.made = []
        loop.remove_reader(sock.fileno())
        server._accept(Exhausted(sock))  # what the loop calls when sock is readable
        assert [e.errno for e in errors] == [errno.EMFILE]
        client = socket.create_connection(sock.getsockname())
        await asyncio.sleep(0.1)
        assert Counting.made == []  # paused: the connection waits in the kernel's queue
        server._resume(sock)  # what the timer does after ACCEPT_RETRY_DELAY
        await asyncio.sleep(0.1)
        assert len(Counting.made) == 1
        client.close()
        assert ACCEPT_RETRY_DELAY > 0
        server.close()

    run(main)


def test_tls_and_unix_sockets_get_uvloops_own_server(tmp_path):
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(Counting, str(tmp_path / "s"))
        assert not isinstance(server, BatchAcceptServer)
        server.close()
        unix = socket.socket(socket.AF_UNIX)
        unix.bind(str(tmp_path / "u"))
        server = await loop.create_server(Counting, sock=unix)
        assert not isinstance(server, BatchAcceptServer)
        server.close()

    run(main)
