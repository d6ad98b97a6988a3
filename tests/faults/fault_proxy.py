"""A TCP proxy in front of one of a real grid's ports, which a test turns into a grid that is gone
for good in the ways a network loses one: ``refuse`` (the port is closed, every connection
reset), ``silence`` (connections are accepted and requests swallowed: nothing ever answers), or
``http_503`` (an API that answers every request with 503, as a deployment's gateway whose
backend is down). ``close()`` ends every thread it started."""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["FaultProxy"]

_ANSWER_503 = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
               b"Content-Length: 35\r\n\r\n{\"message\": \"service unavailable\"}\n")


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target`` (host, port) until told to fail."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode = "forward"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # a closed listener does not wake accept(): it looks
        self.port = self._listener.getsockname()[1]
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._start(self._accept)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="fault-proxy")
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self.mode == "closed":
                sock.close()
                return False
            self._sockets.add(sock)
            return True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                if self.mode == "closed":
                    return
                continue
            except OSError:
                return  # closed: refuse
            client.settimeout(None)
            if not self._track(client):
                return
            if self.mode == "forward":
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                if self._track(upstream):
                    self._start(self._pump, client, upstream)
                    self._start(self._pump, upstream, client)
            else:
                self._start(self._pump, client, None)

    def _pump(self, source: socket.socket, sink: socket.socket | None) -> None:
        """Copy ``source`` to ``sink`` while forwarding; afterwards swallow (silence) or answer 503."""
        try:
            while data := source.recv(65536):
                if self.mode == "forward" and sink is not None:
                    sink.sendall(data)
                elif self.mode == "http_503":
                    source.sendall(_ANSWER_503)
                # silence: dropped
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                if sock is not None and self.mode != "silence":
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def _drop_connections(self) -> None:
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def refuse(self) -> None:
        """The port closes and every connection is reset: connections are refused from now on."""
        self.mode = "closed"
        self._listener.close()
        self._drop_connections()

    def silence(self) -> None:
        """Nothing answers any more, on open connections or new ones (accepted, never served)."""
        self.mode = "silence"

    def http_503(self) -> None:
        """Every request, on a new connection, is answered 503 (open connections are dropped)."""
        self.mode = "http_503"
        self._drop_connections()

    def close(self) -> None:
        """Stop, and end every thread this proxy started."""
        self.refuse()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)
