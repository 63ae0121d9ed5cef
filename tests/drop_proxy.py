"""A TCP proxy in front of an HTTP server that drops the connection at the N+1-th S3 server-side copy.

``DroppingProxy(upstream_url, drop_after_copies=N)`` listens on 127.0.0.1 (OS-assigned port) and
forwards bytes both ways.  It watches client requests for the ``x-amz-copy-source`` header (a
CopyObject / UploadPartCopy request): the first ``N`` pass; at the next one it closes both sockets
without forwarding the request, and from then on every connection is cut at once — the network
is gone, as when a worker loses its link in the middle of the final server-side copy.  ``dropped``
counts the cut connections.
"""
from __future__ import annotations

import select
import socket
import threading
from urllib.parse import urlsplit

_COPY_HEADER = b"x-amz-copy-source"


class DroppingProxy:
    def __init__(self, upstream_url: str, drop_after_copies: int):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self.allowed = drop_after_copies
        self.copies = 0
        self.dropped = 0
        self.broken = False
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "DroppingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._pump, args=(client,), daemon=True).start()

    def _cut(self, *socks: socket.socket) -> None:
        with self._lock:
            self.dropped += 1
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _client_data_allowed(self, data: bytes) -> bool:
        with self._lock:
            if self.broken:
                return False
            if _COPY_HEADER in data.lower():
                self.copies += 1
                if self.copies > self.allowed:
                    self.broken = True
                    return False
            return True

    def _pump(self, client: socket.socket) -> None:
        if self.broken:
            self._cut(client)
            return
        upstream = socket.create_connection(self.upstream)
        pairs = {client: upstream, upstream: client}
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select(list(pairs), [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client and not self._client_data_allowed(data):
                        self._cut(client, upstream)
                        return
                    pairs[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (client, upstream):
                try:
                    sock.close()
                except OSError:
                    pass
