"""A small synchronous gRPC client (HTTP/2 over one socket) for the CLI's fast path.

Why not grpcio: importing grpc (and the asyncio it pulls in) costs more than a whole ``asm run --node``
may take. This client needs only the standard library (socket, select, ssl for TLS) and speaks what
a gRPC server expects of a client: the connection preface and SETTINGS, HEADERS (+CONTINUATION) with
HPACK, DATA with the 5-byte gRPC message framing, flow control both ways (a WINDOW_UPDATE as the
caller takes each message, so a long stream never stalls and a slow reader holds the server back),
PING (answered, and sent while a stream is idle to notice a dead peer), RST_STREAM and GOAWAY. Calls
are unary or server-streaming; several may be open at once on the connection (a unary InterruptRun
while the run's stream is open), one thread drives them all.

Every failure is a :class:`RpcError` with a gRPC status code, details and trailing metadata: the
caller turns it into the same ``asm_wire`` error the grpc path raises (``error_from_rpc``).
"""

from __future__ import annotations

import enum
import os
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from asm_cli._fastrpc import _hpack

if TYPE_CHECKING:
    import ssl

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
#: Our receive windows: a stream's, and the connection's (room for a unary answer beside a full stream).
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 16 << 20
DEFAULT_WINDOW = 65_535
KEEPALIVE_S, KEEPALIVE_TIMEOUT_S = 5.0, 3.0
#: What a peer may send us: we never raise SETTINGS_MAX_FRAME_SIZE from its default, and a header block
#: (HEADERS + CONTINUATIONs, compressed) past our SETTINGS_MAX_HEADER_LIST_SIZE is a hostile peer's
#: (a CONTINUATION flood would otherwise grow the buffer without end).
MAX_FRAME = 16_384
MAX_HEADER_LIST = 1 << 20


class Code(enum.IntEnum):
    """gRPC status codes (the names are grpc.StatusCode's)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


#: An HTTP status other than 200 without a grpc-status (gRPC's "HTTP to gRPC status code mapping").
_HTTP_CODES = {400: Code.INTERNAL, 401: Code.UNAUTHENTICATED, 403: Code.PERMISSION_DENIED, 404: Code.UNIMPLEMENTED,
               429: Code.UNAVAILABLE, 502: Code.UNAVAILABLE, 503: Code.UNAVAILABLE, 504: Code.UNAVAILABLE}
#: RST_STREAM error codes as grpc C-core maps them.
_RST_CODES = {7: Code.UNAVAILABLE, 8: Code.CANCELLED, 11: Code.RESOURCE_EXHAUSTED, 12: Code.PERMISSION_DENIED}


class RpcError(Exception):
    """A call that did not end with status OK (or could not be made)."""

    def __init__(self, code: Code, details: str, trailers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.trailers = tuple(trailers)


class Woken(Exception):
    """The wake-up descriptor given to :meth:`Channel.read` is readable (e.g. a signal arrived)."""


def percent_decode(text: str) -> str:
    """grpc-message is percent-encoded UTF-8; a malformed escape is kept as it is."""
    if "%" not in text:
        return text
    raw = text.encode("latin-1", "replace")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and _is_hex(raw[i + 1:i + 3]):
            out.append(int(raw[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def _timeout_header(seconds: float) -> str:
    ms = max(1, int(seconds * 1000))
    return f"{ms}m" if ms < 100_000_000 else f"{min(99_999_999, int(seconds))}S"


class _Stream:
    __slots__ = ("buf", "ended", "error", "headers", "id", "messages", "send_window", "trailers", "unacked")

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.headers: list[tuple[str, str]] | None = None
        self.trailers: list[tuple[str, str]] | None = None
        self.buf = bytearray()
        self.messages: deque[bytes] = deque()
        self.ended = False  # the peer's END_STREAM, a RST_STREAM or a dead connection
        self.error: RpcError | None = None  # set when it ended otherwise than with trailers
        self.send_window = send_window
        self.unacked = 0  # bytes taken by the caller not yet given back in a WINDOW_UPDATE


class Channel:
    """One HTTP/2 connection to ``host:port`` (TLS when ``ssl_context`` is given, ALPN "h2")."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, connect_timeout: float = 5.0,
                 max_message: int = 64 << 20) -> None:
        self.scheme = "https" if ssl_context is not None else "http"
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.max_message = max_message
        try:
            sock = _connect(host, port, connect_timeout)
        except TimeoutError:
            raise RpcError(Code.UNAVAILABLE, f"failed to connect to {self.authority}: timed out") from None
        except OSError as exc:
            raise RpcError(Code.UNAVAILABLE, f"failed to connect to {self.authority}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
                if sock.selected_alpn_protocol() != "h2":
                    raise RpcError(Code.UNAVAILABLE, f"{self.authority} did not agree to HTTP/2 (ALPN h2)")
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            raise RpcError(Code.UNAVAILABLE, f"TLS handshake with {self.authority} failed: {exc}") from None
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._tls = ssl_context is not None
        self._in = bytearray()
        self._out = bytearray()
        self._decoder = _hpack.Decoder()
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._peer_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._peer_frame = 16_384
        self._send_window = DEFAULT_WINDOW  # the connection's, for our DATA
        self._unacked = 0  # the connection's bytes taken, not yet given back
        self._goaway: int | None = None  # the peer's last stream id once it sent GOAWAY
        self._dead: RpcError | None = None
        self._ping_sent: float | None = None
        settings = struct.pack(">HIHIHI", 2, 0, 4, STREAM_WINDOW, 6, MAX_HEADER_LIST)  # no push; our window; header list
        self._frame(SETTINGS, 0, 0, settings)
        self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", CONNECTION_WINDOW - DEFAULT_WINDOW))
        self._out[:0] = PREFACE
        self._flush()

    # -- the caller's API --------------------------------------------------------------------

    def unary(self, path: str, request: bytes, metadata: Sequence[tuple[str, str]] = (),
              timeout: float | None = None) -> bytes:
        """One unary call: its response message, or RpcError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sid = self.open(path, request, metadata, timeout)
        try:
            message = self.read(sid, deadline)
            if message is None:
                raise RpcError(Code.UNIMPLEMENTED, "the server sent no response message")
            while self.read(sid, deadline) is not None:
                pass  # a second message: gRPC calls it a protocol violation; keep the first
            return message
        finally:
            self._streams.pop(sid, None)

    def open(self, path: str, request: bytes, metadata: Sequence[tuple[str, str]] = (),
             timeout: float | None = None) -> int:
        """Start a call (its one request message sent, half-closed); the stream id to :meth:`read` from."""
        self._check()
        if self._goaway is not None:
            raise RpcError(Code.UNAVAILABLE, "the server is going away (GOAWAY): no new calls on this connection")
        sid = self._next_id
        self._next_id += 2
        headers = [(":method", "POST"), (":scheme", self.scheme), (":path", path), (":authority", self.authority),
                   ("te", "trailers"), ("content-type", "application/grpc"), ("user-agent", "asm-cli")]
        if timeout is not None:
            headers.append(("grpc-timeout", _timeout_header(timeout)))
        headers.extend((k.lower(), v) for k, v in metadata)
        stream = self._streams[sid] = _Stream(sid, self._peer_window)
        block = _hpack.encode(headers)
        first, block = block[:self._peer_frame], block[self._peer_frame:]
        self._frame(HEADERS, END_HEADERS if not block else 0, sid, first)
        while block:
            part, block = block[:self._peer_frame], block[self._peer_frame:]
            self._frame(CONTINUATION, END_HEADERS if not block else 0, sid, part)
        payload = memoryview(struct.pack(">BI", 0, len(request)) + request)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # (a SETTINGS change may have made a window negative: nothing is sent until it grows)
            n = max(0, min(len(payload), self._peer_frame, stream.send_window, self._send_window))
            if n or not payload:
                self._frame(DATA, END_STREAM if n == len(payload) else 0, sid, bytes(payload[:n]))
                stream.send_window -= n
                self._send_window -= n
                payload = payload[n:]
                if not payload:
                    break
                continue
            self._flush()
            if stream.ended:
                break  # answered (or reset) before it took the whole request
            self._pump(deadline, None)  # wait for the peer's WINDOW_UPDATE
        self._flush()
        return sid

    def read(self, sid: int, deadline: float | None = None, wake_fd: int | None = None) -> bytes | None:
        """The stream's next message; None once it ended with status OK; RpcError otherwise. With
        ``wake_fd``, a readable wake-up descriptor while waiting raises :class:`Woken` (read again after)."""
        stream = self._streams[sid]
        while not stream.messages:
            if stream.ended:
                del self._streams[sid]
                self._finish(stream)
                return None
            try:
                self._pump(deadline, wake_fd, keepalive=deadline is None)
            except RpcError as err:
                if err.code == Code.DEADLINE_EXCEEDED:
                    self.cancel(sid)
                raise
        message = stream.messages.popleft()
        self._taken(stream, 5 + len(message))
        return message

    def cancel(self, sid: int) -> None:
        """Cancel a call (RST_STREAM CANCEL); nothing more is read from it."""
        stream = self._streams.pop(sid, None)
        if stream is not None and not stream.ended and self._dead is None:
            self._frame(RST_STREAM, 0, sid, struct.pack(">I", 8))
            self._flush()

    def close(self) -> None:
        if self._dead is None:
            self._dead = RpcError(Code.UNAVAILABLE, "the channel was closed")
            try:
                self._frame(GOAWAY, 0, 0, struct.pack(">II", 0, 0))
                self._flush()
            except RpcError:
                pass
        self.sock.close()

    # -- ending a call -------------------------------------------------------------------------

    def _finish(self, stream: _Stream) -> None:
        """A stream that ended: nothing, or its failure as RpcError."""
        if stream.error is not None:
            raise stream.error
        trailers = stream.trailers if stream.trailers is not None else []
        fields = dict(trailers)
        headers = dict(stream.headers or [])
        status = fields.get("grpc-status")
        if status is None:
            http = headers.get(":status", fields.get(":status", ""))
            if http and http != "200":
                code = _HTTP_CODES.get(int(http) if http.isdigit() else 0, Code.UNKNOWN)
                raise RpcError(code, f"Received http2 header with status: {http}", trailers)
            raise RpcError(Code.UNKNOWN, "the stream ended without a grpc-status", trailers)
        try:
            code = Code(int(status))
        except ValueError:
            code = Code.UNKNOWN
        if code != Code.OK:
            meta = [(k, v) for k, v in trailers if not k.startswith(":") and k not in ("grpc-status", "grpc-message")]
            raise RpcError(code, percent_decode(fields.get("grpc-message", "")), meta)
        if stream.buf:
            raise RpcError(Code.INTERNAL, "the stream ended inside a message")

    # -- frames ----------------------------------------------------------------------------------

    def _check(self) -> None:
        if self._dead is not None:
            raise self._dead

    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        self._out += struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload

    def _flush(self) -> None:
        if not self._out:
            return
        data, self._out = bytes(self._out), bytearray()
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self._die(f"the connection failed: {exc.strerror or exc}") from None

    def _die(self, why: str) -> RpcError:
        """The connection is unusable: every open call fails with the error returned (UNAVAILABLE)."""
        if self._dead is None:
            self._dead = RpcError(Code.UNAVAILABLE, why)
        for stream in self._streams.values():
            if not stream.ended:
                stream.ended = True
                stream.error = self._dead
        return self._dead

    def _taken(self, stream: _Stream, n: int) -> None:
        """The caller took ``n`` bytes: give them back to the peer's windows once half a window is used."""
        self._unacked += n
        stream.unacked += n
        if self._unacked >= CONNECTION_WINDOW // 2:
            self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacked))
            self._unacked = 0
        if stream.unacked >= STREAM_WINDOW // 2 and not stream.ended:
            self._frame(WINDOW_UPDATE, 0, stream.id, struct.pack(">I", stream.unacked))
            stream.unacked = 0
        if self._out:
            self._flush()

    def _recv(self, deadline: float | None, wake_fd: int | None, keepalive: bool) -> None:
        """Read more bytes into the input buffer (waiting until ``deadline``)."""
        if self._tls and self.sock.pending():  # type: ignore[attr-defined]
            chunk = self.sock.recv(1 << 16)
        else:
            fds = [self.sock.fileno()] if wake_fd is None else [self.sock.fileno(), wake_fd]
            while True:
                now = time.monotonic()
                wait = None if deadline is None else max(0.0, deadline - now)
                if keepalive:
                    if self._ping_sent is not None:
                        left = self._ping_sent + KEEPALIVE_TIMEOUT_S - now
                        if left <= 0:
                            raise self._die("the connection is dead (no PING answer within "
                                      f"{KEEPALIVE_TIMEOUT_S:g}s)")
                        wait = left if wait is None else min(wait, left)
                    else:
                        wait = KEEPALIVE_S if wait is None else min(wait, KEEPALIVE_S)
                readable, _, _ = select.select(fds, [], [], wait)
                if wake_fd is not None and wake_fd in readable:
                    raise Woken()
                if readable:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise RpcError(Code.DEADLINE_EXCEEDED, "Deadline Exceeded")
                if keepalive and self._ping_sent is None:  # idle: is the peer still there?
                    self._ping_sent = time.monotonic()
                    self._frame(PING, 0, 0, b"asm-keep")
                    self._flush()
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError as exc:
                raise self._die(f"the connection failed: {exc.strerror or exc}") from None
        if not chunk:
            raise self._die("the server closed the connection")
        self._in += chunk

    def _pump(self, deadline: float | None, wake_fd: int | None, keepalive: bool = False) -> None:
        """Read and handle at least one frame (more if they are already here)."""
        self._check()
        self._recv(deadline, wake_fd, keepalive)
        self._ping_sent = None  # anything from the peer proves it is there
        buf = self._in
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if length > MAX_FRAME:
                raise self._die(f"the server sent a frame of {length} bytes, above the {MAX_FRAME} allowed "
                                "(protocol error)")
            if len(buf) - pos < 9 + length:
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            if ftype == CONTINUATION or (ftype == HEADERS and not flags & END_HEADERS):
                # A header block in pieces: handled once its last CONTINUATION is here.
                block, end, ok = self._header_block(buf, pos - 9 - length)
                if not ok:
                    pos -= 9 + length
                    break
                pos = end
                self._on_headers(sid, flags, block)
                continue
            self._on_frame(ftype, flags, sid, payload)
        del buf[:pos]
        if self._out:
            self._flush()

    def _header_block(self, buf: bytearray, start: int) -> tuple[bytes, int, bool]:
        """A HEADERS frame at ``start`` and its CONTINUATIONs: (block, end, complete?)."""
        length = int.from_bytes(buf[start:start + 3], "big")
        flags = buf[start + 4]
        if buf[start + 3] != HEADERS:
            raise self._die("a CONTINUATION frame without HEADERS (protocol error)")
        parts = [self._strip(flags, bytes(buf[start + 9:start + 9 + length]))]
        pos = start + 9 + length
        while True:
            if len(buf) - pos < 9:
                return b"", 0, False
            if pos - start > MAX_HEADER_LIST:
                raise self._die(f"the server's header block is above the {MAX_HEADER_LIST} bytes allowed "
                                "(protocol error)")
            n = int.from_bytes(buf[pos:pos + 3], "big")
            if n > MAX_FRAME:
                raise self._die(f"the server sent a frame of {n} bytes, above the {MAX_FRAME} allowed "
                                "(protocol error)")
            if len(buf) - pos < 9 + n:
                return b"", 0, False
            if buf[pos + 3] != CONTINUATION:
                raise self._die("a header block interrupted by another frame (protocol error)")
            parts.append(bytes(buf[pos + 9:pos + 9 + n]))
            end_headers = buf[pos + 4] & END_HEADERS
            pos += 9 + n
            if end_headers:
                return b"".join(parts), pos, True

    @staticmethod
    def _strip(flags: int, payload: bytes) -> bytes:
        """A HEADERS payload without its padding and priority fields."""
        pad = 0
        if flags & PADDED:
            pad, payload = payload[0], payload[1:]
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        return payload[:len(payload) - pad] if pad else payload

    def _on_headers(self, sid: int, flags: int, block: bytes) -> None:
        try:
            fields = self._decoder.decode(block, MAX_HEADER_LIST)  # always: the dynamic table must follow every block
        except _hpack.HpackError as exc:
            self._frame(GOAWAY, 0, 0, struct.pack(">II", 0, 9))  # COMPRESSION_ERROR
            raise self._die(f"the server sent an invalid header block: {exc}") from None
        stream = self._streams.get(sid)
        if stream is None:
            return
        if stream.headers is None and not flags & END_STREAM:
            stream.headers = fields
        else:
            if stream.headers is None:
                stream.headers = []  # trailers-only
            stream.trailers = fields
        if flags & END_STREAM:
            stream.ended = True

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if ftype == DATA:
            stream = self._streams.get(sid)
            pad = 0
            if flags & PADDED:  # the pad length byte and the padding count against the windows too
                pad = payload[0] + 1
                payload = payload[1:len(payload) - payload[0]]
            size = len(payload) + pad
            if stream is None:  # a cancelled call's: give its bytes back to the connection
                self._unacked += size
            else:
                if pad:
                    self._taken(stream, pad)
                self._data(stream, payload)
                if flags & END_STREAM:
                    stream.ended = True
            if self._unacked >= CONNECTION_WINDOW // 2:
                self._frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self._unacked))
                self._unacked = 0
        elif ftype == HEADERS:
            self._on_headers(sid, flags, self._strip(flags, payload))
        elif ftype == RST_STREAM:
            stream = self._streams.get(sid)
            if stream is not None and not stream.ended:
                code = int.from_bytes(payload[:4], "big")
                stream.ended = True
                stream.error = RpcError(_RST_CODES.get(code, Code.INTERNAL),
                                        f"Received RST_STREAM with error code {code}")
        elif ftype == SETTINGS:
            if flags & ACK:
                return
            for i in range(0, len(payload) - 5, 6):
                key, value = struct.unpack(">HI", payload[i:i + 6])
                if key == 4:  # INITIAL_WINDOW_SIZE: every open stream's window moves by the change
                    delta, self._peer_window = value - self._peer_window, value
                    for stream in self._streams.values():
                        stream.send_window += delta
                elif key == 5:
                    self._peer_frame = value
            self._frame(SETTINGS, ACK, 0, b"")
        elif ftype == PING:
            if not flags & ACK:
                self._frame(PING, ACK, 0, payload)
        elif ftype == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self._goaway = last
            for stream in self._streams.values():
                if stream.id > last and not stream.ended:  # never processed: safe to make again
                    stream.ended = True
                    stream.error = RpcError(Code.UNAVAILABLE, f"the server went away (GOAWAY, error code {code}) "
                                            "before it took the call")
        elif ftype == WINDOW_UPDATE:
            inc = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if sid == 0:
                self._send_window += inc
            elif sid in self._streams:
                self._streams[sid].send_window += inc
        elif ftype == PUSH_PROMISE:
            raise self._die("the server pushed a stream although push is disabled (protocol error)")
        # PRIORITY and unknown frame types are ignored (RFC 9113 4.1, 5.5).

    def _data(self, stream: _Stream, data: bytes) -> None:
        buf = stream.buf
        buf += data
        while len(buf) >= 5:
            length = int.from_bytes(buf[1:5], "big")
            if buf[0]:
                stream.ended = True
                stream.error = RpcError(Code.INTERNAL, "a compressed message, but no compression was offered")
                self._frame(RST_STREAM, 0, stream.id, struct.pack(">I", 8))
                return
            if length > self.max_message:
                stream.ended = True
                stream.error = RpcError(Code.RESOURCE_EXHAUSTED, f"Received message larger than max ({length} vs. "
                                        f"{self.max_message})")
                self._frame(RST_STREAM, 0, stream.id, struct.pack(">I", 8))
                return
            if len(buf) < 5 + length:
                return
            stream.messages.append(bytes(buf[5:5 + length]))
            del buf[:5 + length]


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """socket.create_connection, without the idna codec for an address or an ASCII name (its import,
    with stringprep and unicodedata, costs more than the connect on a loopback)."""
    addresses: list[tuple[int, tuple[Any, ...]]] = []
    for family in (int(socket.AF_INET), int(socket.AF_INET6)):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        addresses = [(family, (host, port))]
    if not addresses:
        name = host.encode("ascii") if host.isascii() else host.encode("idna")
        addresses = [(int(info[0]), info[4]) for info in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)]
    last: OSError | None = None
    deadline = time.monotonic() + timeout
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last if last is not None else OSError(f"no address for {host}")


def wake_pipe() -> tuple[int, int]:
    """A non-blocking pipe for ``signal.set_wakeup_fd`` (read end, write end)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w
