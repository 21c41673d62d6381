"""Clients that leave while their stream waits for the speech server.

A relay learns that its client hung up only when it next writes to it, which can be a whole
piece of synthesis later: meanwhile the speech server goes on working for nobody, and the
requests behind it wait. `Watch` is one thread per gateway process that watches the sockets
of the clients with a stream open; when one of them ends (the client closed it, or it was
reset) it calls that stream's `on_gone`, which shuts the upstream response down so the
relay's wait ends at once and the speech server's connection closes.

A socket that has data waiting (a pipelined request) cannot be told apart from a live
client without reading what is not ours, so it is no longer watched; nor are sockets that
cannot be peeked at (TLS terminated by the server itself): those streams end as before, at
their next write. A client that closes only its sending side while it goes on reading would be
taken for gone; HTTP clients and proxies (nginx included) do not do that.
"""

import logging
import os
import selectors
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

# How long the watcher waits for news before it looks again for new sockets to watch.
POLL_SECONDS = 0.5


def peer_closed(client: socket.socket) -> bool | None:
    """True when the client has closed or reset its side; False when it sent data; None when nothing is waiting."""
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return None
    except ValueError:
        # A TLS socket cannot peek: whatever is waiting, it cannot be told apart from data.
        return False
    except OSError:
        return True


class Watch:
    """One thread per process (started with the first socket it is given, again after a fork)."""

    def __init__(self):
        self._selector = None
        self._pid = None
        self._lock = threading.Lock()

    def add(self, client: socket.socket, on_gone: Callable[[], None]) -> Callable[[], None]:
        """Call `on_gone` once when `client` ends; returns the function that stops watching it."""
        with self._lock:
            if self._pid != os.getpid():
                self._selector, self._pid = selectors.DefaultSelector(), os.getpid()
                threading.Thread(target=self._run, args=(self._selector,), name="hang-ups", daemon=True).start()
            selector = self._selector
            try:
                selector.register(client, selectors.EVENT_READ, on_gone)
            except (ValueError, KeyError, OSError):
                return lambda: None

        def stop() -> None:
            with self._lock:
                try:
                    selector.unregister(client)
                except (KeyError, ValueError, OSError):
                    pass

        return stop

    def _run(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                ready = selector.select(POLL_SECONDS)
            except (OSError, ValueError):
                ready = []
            for key, _ in ready:
                closed = peer_closed(key.fileobj)
                if closed is None:
                    continue
                with self._lock:
                    try:
                        selector.unregister(key.fileobj)
                    except (KeyError, ValueError, OSError):
                        continue  # its stream ended meanwhile
                if closed:
                    try:
                        key.data()
                    except Exception:
                        log.exception("a stream's hang-up could not be handled")
