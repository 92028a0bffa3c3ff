"""The CLI's stdlib gRPC client (asm_cli._fastrpc): HPACK against RFC 7541's examples, and the client
against a real grpc.aio server -- unary, long server streams through flow control, errors in
trailers and trailers-only, deadlines, cancellation, a server that goes away or closes the connection."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from asm_cli._fastrpc import _hpack
from asm_cli._fastrpc._client import Channel, Code, RpcError, percent_decode
from asm_wire import error_from_rpc

# -- HPACK: RFC 7541 Appendix C -----------------------------------------------------------------------


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def test_integers_rfc_c1() -> None:
    assert _hpack.encode_integer(10, 5) == b"\x0a"
    assert _hpack.encode_integer(1337, 5) == b"\x1f\x9a\x0a"
    assert _hpack.encode_integer(42, 8) == b"\x2a"
    d = _hpack.Decoder()
    # 1337 as a literal's name length would not fit; decode it through a size update (5-bit prefix)
    d.max_allowed = 4096
    d.decode(b"\x3f\xe1\x1f")  # size update to 31 + 0x61 + (0x1f << 7) = 4096
    assert d.max_size == 4096


REQUESTS = [
    [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")],
    [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com"),
     ("cache-control", "no-cache")],
    [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"), (":authority", "www.example.com"),
     ("custom-key", "custom-value")],
]
C3 = ["8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
      "8286 84be 5808 6e6f 2d63 6163 6865",
      "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65"]
C4 = ["8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
      "8286 84be 5886 a8eb 1064 9cbf",
      "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"]
DATE1, DATE2 = "Mon, 21 Oct 2013 20:13:21 GMT", "Mon, 21 Oct 2013 20:13:22 GMT"
LOCATION = ("location", "https://www.example.com")
COOKIE = ("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")
RESPONSES = [
    [(":status", "302"), ("cache-control", "private"), ("date", DATE1), LOCATION],
    [(":status", "307"), ("cache-control", "private"), ("date", DATE1), LOCATION],
    [(":status", "200"), ("cache-control", "private"), ("date", DATE2), LOCATION, ("content-encoding", "gzip"),
     COOKIE],
]
#: The dynamic table after each response (newest first), with its size: evictions at 256 octets.
RESPONSE_TABLES = [
    ([LOCATION, ("date", DATE1), ("cache-control", "private"), (":status", "302")], 222),
    ([(":status", "307"), LOCATION, ("date", DATE1), ("cache-control", "private")], 222),
    ([COOKIE, ("content-encoding", "gzip"), ("date", DATE2)], 215),
]
C5 = ["4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d"
      "546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
      "4803 3330 37c1 c0bf",
      "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d 54c0 5a04 677a 6970 7738 666f"
      "6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049 5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b"
      "2076 6572 7369 6f6e 3d31"]
C6 = ["4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7"
      "8f0b 97c8 e9ae 82ae 43d3",
      "4883 640e ffc1 c0bf",
      "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab 77ad 94e7 821d d7f2 e6c7 b335"
      "dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f 9587 3160 65c0 03ed 4ee5 b106 3d50 07"]


@pytest.mark.parametrize("blocks", [C3, C4], ids=["C.3", "C.4-huffman"])
def test_request_examples(blocks: list[str]) -> None:
    d = _hpack.Decoder()
    for block, expected in zip(blocks, REQUESTS, strict=True):
        assert d.decode(_hex(block)) == expected
    assert list(d.table) == [("custom-key", "custom-value"), ("cache-control", "no-cache"),
                             (":authority", "www.example.com")] and d.size == 164


@pytest.mark.parametrize("blocks", [C5, C6], ids=["C.5", "C.6-huffman"])
def test_response_examples_evict_from_a_256_octet_table(blocks: list[str]) -> None:
    d = _hpack.Decoder(max_table_size=256)
    for block, expected, (table, size) in zip(blocks, RESPONSES, RESPONSE_TABLES, strict=True):
        assert d.decode(_hex(block)) == expected
        assert (list(d.table), d.size) == (table, size)


def test_table_size_update_evicts_and_is_bounded() -> None:
    d = _hpack.Decoder(max_table_size=256)
    d.decode(_hex(C5[0]))
    assert d.decode(b"\x3f\x21" + b"\xbe") == [LOCATION]  # size 64: only the newest entry (63 octets) stays
    assert list(d.table) == [LOCATION]
    assert d.decode(b"\x20") == [] and list(d.table) == [] and d.size == 0  # size 0 empties it
    with pytest.raises(_hpack.HpackError):
        d.decode(b"\x3f\xe2\x01")  # 287: above what we allowed
    with pytest.raises(_hpack.HpackError):
        d.decode(b"\x82\x20")  # an update after a field


@pytest.mark.parametrize("bad", [b"\x80", b"\xbe", b"\x41", b"\x41\x85ab", b"\x41\x81\x00", b"\x41\x84\xff\xff\xff\xff"])
def test_invalid_blocks_are_refused(bad: bytes) -> None:
    # index 0; an empty dynamic table; truncated; a literal too short; padding not all ones; EOS in the string
    with pytest.raises(_hpack.HpackError):
        _hpack.Decoder().decode(bad)


def test_a_block_that_expands_past_the_header_list_size_is_refused() -> None:
    # One 4000-byte field in the table, then 300 one-byte references to it: 1.2 MB from a 4 kB block.
    d = _hpack.Decoder()
    block = b"\x40" + _hpack.encode_integer(1, 7) + b"x" + _hpack.encode_integer(4000, 7) + b"v" * 4000
    assert d.decode(block, max_list_size=1 << 20) == [("x", "v" * 4000)]
    with pytest.raises(_hpack.HpackError, match="header list above"):
        d.decode(b"\xbe" * 300, max_list_size=1 << 20)


def test_never_indexed_and_without_indexing_literals_leave_the_table_alone() -> None:
    d = _hpack.Decoder()
    block = b"\x10\x08password\x06secret" + b"\x04\x0c/sample/path"  # C.2.3 and C.2.2
    assert d.decode(block) == [("password", "secret"), (":path", "/sample/path")]
    assert list(d.table) == []


def test_our_encoder_round_trips_through_the_decoder() -> None:
    headers = [(":path", "/asm.v1.NodeService/StartRun"), ("authorization", "Bearer " + "t" * 300),
               ("x-bin", "\x00\xff latin-1"), ("empty", "")]
    assert _hpack.Decoder().decode(_hpack.encode(headers)) == headers


def test_huffman_decodes_every_byte() -> None:
    # Every symbol's own code, then padding: the code table is the canonical one of the lengths given.
    codes = {sym: key for key, sym in _hpack._huffman_codes().items()}
    for sym in range(256):
        length, code = codes[sym]
        pad = (8 - length % 8) % 8
        value = (code << pad) | ((1 << pad) - 1)
        raw = value.to_bytes((length + pad) // 8, "big")
        assert _hpack.huffman_decode(raw) == bytes([sym])
    assert codes[256] == (30, 0x3FFFFFFF)


def test_percent_decoding_of_grpc_message() -> None:
    assert percent_decode("no escapes") == "no escapes"
    assert percent_decode("100%25 sure %E2%9C%94") == "100% sure \u2714"
    assert percent_decode("bad %zz and %4") == "bad %zz and %4"


# -- the client against a grpc.aio server ---------------------------------------------------------------


class _Server:
    """A grpc.aio server on 127.0.0.1 in a thread of its own, with a few raw-bytes methods."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.cancelled = threading.Event()
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.port = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Any = self.call(self._start())

    def call(self, coro: Any, timeout: float = 20.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> Any:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])

        async def echo(request: bytes, context: Any) -> bytes:
            self.calls.append(("echo", dict(context.invocation_metadata())))
            return request

        async def fail(request: bytes, context: Any) -> bytes:
            code = grpc.StatusCode[request.decode()]
            context.set_trailing_metadata((("asm-error-kind", "not_found"), ("asm-error-domain", "runtime")))
            await context.abort(code, "no run 50% \u2714 here")
            return b""

        async def fail_plain(request: bytes, context: Any) -> bytes:
            await context.abort(grpc.StatusCode[request.decode()], "plain failure")
            return b""

        async def slow(request: bytes, context: Any) -> bytes:
            await asyncio.sleep(float(request.decode()))
            return b"late"

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            count, size = (int(x) for x in request.decode().split(","))
            for i in range(count):
                yield i.to_bytes(4, "big") + b"x" * (size - 4)

        async def forever(request: bytes, context: Any) -> AsyncIterator[bytes]:
            try:
                yield b"first"
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

        handlers: dict[str, Any] = {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "FailPlain": grpc.unary_unary_rpc_method_handler(fail_plain),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Forever": grpc.unary_stream_rpc_method_handler(forever),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server

    def stop(self, grace: float | None = None) -> None:
        self.call(self.server.stop(grace))

    def close(self) -> None:
        self.stop(None)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    try:
        yield s
    finally:
        s.close()


def _channel(server: _Server) -> Channel:
    return Channel("127.0.0.1", server.port, connect_timeout=5)


def test_unary_calls_with_metadata_on_one_connection(server: _Server) -> None:
    ch = _channel(server)
    try:
        for i in range(50):  # the server's HPACK dynamic table and Huffman coding, many times over
            payload = f"hello {i}".encode() * (i + 1)
            assert ch.unary("/t.T/Echo", payload, [("authorization", "Bearer tok"), ("x-i", str(i))], 5) == payload
        assert ch.unary("/t.T/Echo", b"", timeout=5) == b""  # an empty message
        big = bytes(range(256)) * 4096  # 1 MiB up: our DATA within the server's windows
        assert ch.unary("/t.T/Echo", big, timeout=20) == big
    finally:
        ch.close()
    assert server.calls[0][1]["authorization"] == "Bearer tok" and server.calls[5][1]["x-i"] == "5"


def test_a_long_stream_goes_through_flow_control(server: _Server) -> None:
    ch = _channel(server)
    try:
        sid = ch.open("/t.T/Stream", b"300000,100")  # 30 MB: several times every window
        n = 0
        while (message := ch.read(sid)) is not None:
            assert int.from_bytes(message[:4], "big") == n and len(message) == 100
            n += 1
        assert n == 300_000
        assert ch.unary("/t.T/Echo", b"still usable", timeout=5) == b"still usable"
    finally:
        ch.close()


def test_a_unary_call_beside_an_open_stream(server: _Server) -> None:
    ch = _channel(server)
    try:
        sid = ch.open("/t.T/Stream", b"20000,1000")  # 20 MB: more than the stream window waits unread
        assert ch.read(sid) is not None
        assert ch.unary("/t.T/Echo", b"beside", timeout=10) == b"beside"
        count = 1
        while ch.read(sid) is not None:
            count += 1
        assert count == 20_000
    finally:
        ch.close()


@pytest.mark.parametrize("code", ["NOT_FOUND", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                                  "FAILED_PRECONDITION"])
def test_errors_come_with_their_status_message_and_trailers(server: _Server, code: str) -> None:
    ch = _channel(server)
    try:
        with pytest.raises(RpcError) as info:
            ch.unary("/t.T/Fail", code.encode(), timeout=5)
        err = info.value
        assert err.code.name == code and err.details == "no run 50% \u2714 here"
        assert ("asm-error-kind", "not_found") in err.trailers
        typed = error_from_rpc(err.code, err.details, err.trailers)  # as the grpc path makes it
        assert typed.kind == "not_found" and typed.message == "no run 50% \u2714 here"
        with pytest.raises(RpcError) as plain:
            ch.unary("/t.T/FailPlain", code.encode(), timeout=5)
        assert plain.value.code.name == code and plain.value.details == "plain failure"
        with pytest.raises(RpcError) as missing:  # trailers-only: an unknown method
            ch.unary("/t.T/Nope", b"", timeout=5)
        assert missing.value.code == Code.UNIMPLEMENTED
    finally:
        ch.close()


def test_the_same_typed_error_as_through_grpc(server: _Server) -> None:
    async def through_grpc() -> Any:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            try:
                call: Any = channel.unary_unary("/t.T/Fail")
                await call(b"NOT_FOUND", timeout=5)
            except grpc.aio.AioRpcError as exc:
                return error_from_rpc(exc.code(), exc.details(), exc.trailing_metadata())
        raise AssertionError("no error")

    theirs = asyncio.run(through_grpc())
    ch = _channel(server)
    try:
        with pytest.raises(RpcError) as info:
            ch.unary("/t.T/Fail", b"NOT_FOUND", timeout=5)
    finally:
        ch.close()
    ours = error_from_rpc(info.value.code, info.value.details, info.value.trailers)
    assert (type(ours), ours.kind, ours.domain, ours.reason, ours.message) == (
        type(theirs), theirs.kind, theirs.domain, theirs.reason, theirs.message)


def test_a_deadline(server: _Server) -> None:
    ch = _channel(server)
    try:
        t0 = time.monotonic()
        with pytest.raises(RpcError) as info:
            ch.unary("/t.T/Slow", b"5", timeout=0.3)
        assert info.value.code == Code.DEADLINE_EXCEEDED and time.monotonic() - t0 < 3
        assert ch.unary("/t.T/Slow", b"0", timeout=5) == b"late"  # the connection goes on
    finally:
        ch.close()


def test_cancelling_a_stream_reaches_the_server(server: _Server) -> None:
    ch = _channel(server)
    try:
        sid = ch.open("/t.T/Forever", b"")
        assert ch.read(sid) == b"first"
        ch.cancel(sid)
        assert server.cancelled.wait(10)
        assert ch.unary("/t.T/Echo", b"after", timeout=5) == b"after"
    finally:
        ch.close()


def test_a_server_that_goes_away_finishes_its_calls_and_takes_no_new_one(server: _Server) -> None:
    ch = _channel(server)
    try:
        sid = ch.open("/t.T/Stream", b"2000,100")
        assert ch.read(sid) is not None
        fut = asyncio.run_coroutine_threadsafe(server.server.stop(5), server.loop)  # GOAWAY, then a grace period
        n = 1
        while ch.read(sid) is not None:
            n += 1
        assert n == 2000
        deadline = time.monotonic() + 5
        with pytest.raises(RpcError) as info:
            while time.monotonic() < deadline:  # until the GOAWAY is here
                ch.unary("/t.T/Echo", b"x", timeout=1)
        assert info.value.code == Code.UNAVAILABLE
        fut.result(10)
    finally:
        ch.close()


def test_a_server_that_closes_the_connection_fails_the_open_call(server: _Server) -> None:
    ch = _channel(server)
    try:
        sid = ch.open("/t.T/Forever", b"")
        assert ch.read(sid) == b"first"
        server.stop(None)  # no grace: the connection is closed under the call
        with pytest.raises(RpcError) as info:
            ch.read(sid, deadline=time.monotonic() + 10)
        assert info.value.code in (Code.UNAVAILABLE, Code.CANCELLED)
        with pytest.raises(RpcError):
            ch.unary("/t.T/Echo", b"x", timeout=1)
    finally:
        ch.close()


def test_nothing_listening_is_unavailable() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RpcError) as info:
        Channel("127.0.0.1", port, connect_timeout=2)
    assert info.value.code == Code.UNAVAILABLE
    assert error_from_rpc(info.value.code, info.value.details, ()).kind == "connection_failed"


def _hostile_server(frames: bytes) -> tuple[int, threading.Thread]:
    """A raw socket "server" on 127.0.0.1: it takes one connection, sends ``frames`` after its own
    SETTINGS, and waits for the client to hang up (at most 20 s)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            listener.settimeout(20)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(20)
                conn.recv(1 << 16)  # the preface and the client's SETTINGS
                with contextlib.suppress(OSError):
                    conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + frames)
                    while conn.recv(1 << 16):
                        pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return port, thread


def _raw_frame(ftype: int, flags: int, sid: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


@pytest.mark.parametrize(("frames", "said"), [
    # A header block that never ends: HEADERS, then CONTINUATIONs (each 16 KiB) past the 1 MiB allowed.
    (_raw_frame(1, 0, 1, b"\x88") + b"".join(_raw_frame(9, 0, 1, b"\x00" * 16_384) for _ in range(80)),
     "header block"),
    # A frame longer than the 16384 bytes we allow (we never raise SETTINGS_MAX_FRAME_SIZE).
    (_raw_frame(0, 0, 1, b"", length=1 << 23), "frame of 8388608 bytes"),
])
def test_a_hostile_server_is_refused_with_a_typed_error_not_an_ever_growing_buffer(frames: bytes, said: str) -> None:
    port, thread = _hostile_server(frames)
    ch = Channel("127.0.0.1", port, connect_timeout=5)
    try:
        sid = ch.open("/t.T/Stream", b"")
        with pytest.raises(RpcError) as info:
            ch.read(sid, deadline=time.monotonic() + 15)
        assert info.value.code == Code.UNAVAILABLE and said in info.value.details, info.value.details
        assert len(ch._in) <= 2 << 20  # what it buffered stayed bounded
    finally:
        ch.close()
        thread.join(25)
