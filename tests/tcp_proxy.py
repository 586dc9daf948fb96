"""A TCP proxy a test controls, between a service and a shared backend it must not disturb.

Frozen, it holds every byte and answers nothing, as a server whose process is stopped does
(connections are accepted, nothing comes back); thawed, it forwards again. `rate` throttles what
it forwards towards the backend, so that a request's body is still in flight when the test acts.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

from tessera import procs

_CHUNK_BYTES = 16 * 1024
_POLL_S = 0.05


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `target` (host, port), one thread pair per connection."""

    def __init__(self, target: tuple[str, int], *, upstream_bytes_per_s: float | None = None):
        self.target = target
        self.upstream_bytes_per_s = upstream_bytes_per_s
        self.port = procs.free_ports(1)[0]
        self.upstream_bytes = 0  # forwarded towards the target, over every connection
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(_POLL_S)
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> TcpProxy:
        self._acceptor.start()
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._closed.set()
        self._flowing.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def freeze(self) -> None:
        """Stop forwarding, in both directions and on every connection, new ones included."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._flowing.wait()  # frozen: the connection is accepted and nothing answers
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets += [client, upstream]
        for source, sink, towards_target in ((client, upstream, True), (upstream, client, False)):
            threading.Thread(
                target=self._pump, args=(source, sink, towards_target), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, towards_target: bool) -> None:
        source.settimeout(_POLL_S)
        try:
            while not self._closed.is_set():
                try:
                    data = source.recv(_CHUNK_BYTES)
                except TimeoutError:
                    continue
                if not data:
                    break
                while not self._flowing.wait(_POLL_S):
                    if self._closed.is_set():
                        return
                sink.sendall(data)
                if towards_target:
                    self.upstream_bytes += len(data)
                    if self.upstream_bytes_per_s:
                        time.sleep(len(data) / self.upstream_bytes_per_s)
        except OSError:
            pass
        finally:
            # One side ended (or failed): end both, as a broken connection does.
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
