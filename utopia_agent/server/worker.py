"""The gunicorn worker the agent runs: gthread, except that the event loop reads each request whole.

gunicorn's gthread worker gives a connection to a thread as soon as its first byte arrives,
and the thread then waits on the socket, with no time limit, until the headers and the body
are in. A few clients that send slowly, or stop halfway, hold every thread of every worker
and `/health` stops answering. Here the worker's event loop reads each request without
blocking, closes a connection whose request is not in within the read timeout
(UTOPIA_AGENT_READ_TIMEOUT), and only then hands it to a thread, which parses it from memory
and never waits on the client. Closing a connection, which gthread does on its event loop
with a blocking drain of up to two seconds, is done without blocking too.

With UTOPIA_AGENT_TLS_CERT_FILE the TLS handshake is done in that loop too, without blocking
(gunicorn's own TLS does it in a thread, which a client that never sends its ClientHello holds):
the handshake and then the request must be in within the read timeout, and a thread gets only
decrypted, whole requests. SIGHUP makes the worker serve the files' new pair to new connections
(server/tls_reload.py); connections already open keep theirs.
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
from collections import deque
from functools import partial
from selectors import EVENT_READ, EVENT_WRITE

from gunicorn import http
from gunicorn.workers.gthread import ThreadWorker

from ..config import ConfigError, TlsFiles
from .tls_reload import note_served_certificate

HEAD_LIMIT = 64 * 1024
RECV_SIZE = 64 * 1024
# As gunicorn's own graceful close (util.close_graceful): how long the client may take to close.
LINGER_SECONDS = 2.0
_HEX_DIGITS = b"0123456789abcdefABCDEF"


class IncomingRequest:
    """One HTTP/1.1 request's bytes as they arrive, and whether it is all in.

    Only the framing is read here (where the head ends, Content-Length, chunked coding);
    gunicorn's parser checks everything else once the request reaches a thread, so bytes it
    would refuse count as complete and get its 400 at once.
    """

    def __init__(self, body_limit: int):
        self.data = bytearray()
        self.body_limit = body_limit
        # Set once the head is in: where the body starts, and where it ends or its next chunk begins.
        self._body_start: int | None = None
        self._body_end: int | None = None
        self._next_chunk: int | None = None
        self._expects_continue = False
        # Handed on before it was all in, because it is over a bound: the answer closes the connection.
        self.cut_short = False

    def feed(self, data: bytes) -> bool:
        """Add what arrived; True once the request can go to a thread (whole, refusable or over a bound)."""
        searched = len(self.data)
        self.data += data
        if self._body_start is None:
            head_end = self.data.find(b"\r\n\r\n", max(searched - 3, 0))
            if head_end < 0:
                if self.data.find(b"\n\n", max(searched - 1, 0)) >= 0:
                    return True  # bare LF line ends: the parser refuses them
                return self._over(HEAD_LIMIT, len(self.data))
            self._frame_body(head_end)
        if self._next_chunk is not None:
            return self._chunked_body_in()
        return len(self.data) >= self._body_end

    def continue_due(self) -> bool:
        """True once, while the client waits for "100 Continue" before it sends the body."""
        due, self._expects_continue = self._expects_continue, False
        return due

    def _frame_body(self, head_end: int) -> None:
        self._body_start = self._body_end = head_end + 4
        request_line, *fields = bytes(self.data[:head_end]).split(b"\r\n")
        lengths, codings = [], []
        for field in fields:
            name, _, value = field.partition(b":")
            name, value = name.lower(), value.strip()
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings += [coding.strip().lower() for coding in value.split(b",")]
            elif name == b"expect":
                self._expects_continue = value.lower() == b"100-continue" and request_line.endswith(b"HTTP/1.1")
        if codings:
            if codings[-1] == b"chunked" and not lengths:
                self._next_chunk = self._body_start
        elif len(lengths) == 1 and lengths[0].isdigit():
            length = int(lengths[0])
            if length > self.body_limit:
                self.cut_short = True  # the application answers 413 from the header alone
            else:
                self._body_end += length

    def _chunked_body_in(self) -> bool:
        while True:
            line_end = self.data.find(b"\r\n", self._next_chunk)
            if line_end < 0:
                break
            size = bytes(self.data[self._next_chunk:line_end]).partition(b";")[0].strip()
            if not size or size.strip(_HEX_DIGITS):
                return True  # the parser refuses it
            if int(size, 16) == 0:
                if self.data.find(b"\r\n\r\n", line_end) >= 0:
                    return True
                break
            self._next_chunk = line_end + 2 + int(size, 16) + 2
        return self._over(self.body_limit, max(len(self.data), self._next_chunk) - self._body_start)

    def _over(self, limit: int, size: int) -> bool:
        self.cut_short = size > limit
        return self.cut_short


class WholeRequestWorker(ThreadWorker):
    """gthread with the reading of requests, and the closing of connections, in the event loop."""

    # gunicorn.conf.py's post_fork sets these from the agent's configuration (no TLS: None).
    read_timeout = 10.0
    body_limit = 64 * 1024
    tls_files: TlsFiles | None = None
    tls_context: ssl.SSLContext | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Each in the order of its connections' deadlines (conn.timeout), as gthread keeps its kept-alive ones.
        self.reading_conns: deque = deque()
        self.lingering_conns: deque = deque()

    @classmethod
    def check_config(cls, cfg, log):
        super().check_config(cfg, log)
        if cfg.is_ssl or "h2" in cfg.http_protocols:
            raise RuntimeError("the agent's worker reads plain HTTP/1.1 in its event loop: terminate TLS and HTTP/2 in front of it")

    def init_signals(self):
        super().init_signals()
        if self.tls_files is not None:
            # Set where gunicorn has just reset it to the default, which would end the worker; a
            # SIGHUP held since the fork (server/tls_reload.py install) is taken now, by this handler.
            signal.signal(signal.SIGHUP, self._on_hup)
            signal.siginterrupt(signal.SIGHUP, False)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    def _on_hup(self, _sig, _frame):
        self.method_queue.defer(self._reload_tls)

    def _reload_tls(self):
        """Serve the pair now in the files to new connections; open ones keep theirs (the master checked the files)."""
        try:
            self.tls_context = self.tls_files.server_context()
        except ConfigError as error:
            self.log.error("kept the certificate in service: %s", error)
            return
        note_served_certificate(self.tls_files)

    def enqueue_req(self, conn):
        """Read the connection's next request in the event loop; a thread gets it once it is in.

        A new connection on HTTPS first does its handshake here, within the same read timeout.
        """
        if self.tls_context is not None and not isinstance(conn.sock, ssl.SSLSocket):
            self._start_handshake(conn)
            return
        conn.sock.setblocking(False)  # a TLS read that polled ready may still lack the rest of its record
        if conn.parser is None:
            # A parser with no source of its own: it reads only what the loop puts in, then sees the end.
            conn.parser = http.get_parser(self.cfg, (), conn.client)
            conn.data_ready = True
        conn.incoming = IncomingRequest(self.body_limit)
        conn.timeout = time.monotonic() + self.read_timeout
        # What the last request left behind, else what is there now: on a kept-alive connection, the whole request.
        data = conn.parser.unreader.take_buffered() or _receive_request(conn.sock)
        if data == b"":
            self._close(conn)
        elif data and conn.incoming.feed(data):
            self._hand_over(conn)
        else:
            self.reading_conns.append(conn)
            self.poller.register(conn.sock, EVENT_READ, partial(self._on_request_bytes, conn))
            self._send_continue_if_due(conn)

    def _start_handshake(self, conn):
        try:
            conn.sock = self.tls_context.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
        except OSError:
            self._close(conn)  # gone before it could be wrapped
            return
        conn.timeout = time.monotonic() + self.read_timeout
        self.reading_conns.append(conn)
        self.poller.register(conn.sock, EVENT_READ, partial(self._on_handshake_event, conn))

    def _on_handshake_event(self, conn, _sock):
        """One step of the handshake, as far as what the client sent allows; then its first request."""
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self.poller.modify(conn.sock, EVENT_READ, partial(self._on_handshake_event, conn))
            return
        except ssl.SSLWantWriteError:
            self.poller.modify(conn.sock, EVENT_WRITE, partial(self._on_handshake_event, conn))
            return
        except (ssl.SSLError, OSError) as error:
            # No certificate, a stranger's, plain HTTP, a scanner: the client's mistake, not the operator's.
            self.log.debug("TLS handshake with %s failed: %s", conn.client, error)
            self.poller.unregister(conn.sock)
            self.reading_conns.remove(conn)
            self._close(conn)
            return
        self.poller.unregister(conn.sock)
        self.reading_conns.remove(conn)
        self.enqueue_req(conn)

    def _on_request_bytes(self, conn, _sock):
        data = _receive_request(conn.sock)
        if data is None:
            return
        if data and not conn.incoming.feed(data):
            self._send_continue_if_due(conn)
            return
        self.poller.unregister(conn.sock)
        self.reading_conns.remove(conn)
        if data:
            self._hand_over(conn)
        else:
            self._close(conn)

    def _send_continue_if_due(self, conn):
        if conn.incoming.continue_due():
            try:
                # Non-blocking here (enqueue_req); TLS sockets take no flags.
                conn.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass

    def _hand_over(self, conn):
        conn.parser.unreader.unread(bytes(conn.incoming.data))
        super().enqueue_req(conn)

    def handle_request(self, req, conn):
        if conn.incoming.cut_short:
            req.force_close()
        if isinstance(conn.sock, ssl.SSLSocket):
            req.scheme = "https"  # gunicorn's own TLS would say so; its settings know nothing of ours
        return super().handle_request(req, conn)

    def finish_request(self, conn, fs):
        """As gthread, but a connection that is done closes without blocking the event loop."""
        if fs.cancelled() or fs.exception() is not None or fs.result():
            super().finish_request(conn, fs)
            return
        try:
            if isinstance(conn.sock, ssl.SSLSocket):
                _send_close_notify(conn.sock)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.timeout = time.monotonic() + LINGER_SECONDS
        self.lingering_conns.append(conn)
        self.poller.register(conn.sock, EVENT_READ, partial(self._on_lingering_bytes, conn))

    def _on_lingering_bytes(self, conn, _sock):
        """Drain what the client still sends after its answer, so the close sends no reset that cuts the answer off."""
        if _receive(conn.sock) == b"":
            self.poller.unregister(conn.sock)
            self.lingering_conns.remove(conn)
            self._close(conn)

    def murder_pending(self):
        """Also close the connections whose request is not in by their deadline, and those done lingering."""
        super().murder_pending()
        now = time.monotonic()
        for conn in _expired(self.reading_conns, now):
            self.log.debug("closing %s: its request was not in within %ss", conn.client, self.read_timeout)
            self.poller.unregister(conn.sock)
            self._close(conn)
        for conn in _expired(self.lingering_conns, now):
            self.poller.unregister(conn.sock)
            self._close(conn)

    def _close(self, conn):
        self.nr_conns -= 1
        conn.close()


def _expired(conns: deque, now: float):
    """Take the connections whose deadline has passed off the front of a deque kept in deadline order."""
    while conns and conns[0].timeout <= now:
        yield conns.popleft()


def _send_close_notify(sock: ssl.SSLSocket) -> None:
    """Tell a TLS client the answer is whole (an end without it reads as a cut), without waiting for its own."""
    sock.setblocking(False)
    try:
        sock.unwrap()
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        pass  # ours is sent; the client's is not in yet, and the lingering drain reads it


def _receive_request(sock: socket.socket) -> bytes | None:
    """As _receive, decrypted on HTTPS, with what the TLS layer holds already (the poller cannot see it)."""
    if not isinstance(sock, ssl.SSLSocket):
        return _receive(sock)
    try:
        data = sock.recv(RECV_SIZE)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    except OSError:
        return b""
    while data and sock.pending():  # decrypted already: a read cannot wait nor fail
        data += sock.recv(sock.pending())
    return data


def _receive(sock: socket.socket) -> bytes | None:
    """What the client sent, without waiting: None when nothing is there yet, b"" when it is gone."""
    try:
        return sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
