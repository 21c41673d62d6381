"""Work done in rounds by a thread of each gateway process, never inside a request.

A `Rounds` thread starts with the first request its process serves (a forked worker starts its
own), does one round, then sleeps until woken (`wake`, set after a commit that queued work) or
for `poll_seconds`, for work other processes queued and for retries. A round that fails is
logged and the next one tries again. The mail sender (app/mail/worker.py) and the automatic
top-up buyer (app/card_payments.py) are such threads; each also has a CLI command that runs
it as a service of its own.
"""

import logging
import os
import threading

log = logging.getLogger(__name__)


class Rounds:
    """One thread per process that calls `work()` in an app context, round after round."""

    name = "rounds"

    def __init__(self, app, poll_seconds: float):
        self.app = app
        self.poll_seconds = poll_seconds
        self.wake = threading.Event()
        self._pid = None
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = None

    def work(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, wait: float = 10.0) -> None:
        """End the thread after its current round, waiting up to `wait` seconds for that round to end, so that
        nothing it does (a query, a log line) outlives its caller (tests; a process that ends takes it along)."""
        self._stopped = True
        self.wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)

    def run(self, rounds: int | None = None) -> None:
        """Work until the process ends (or for `rounds` rounds); an error in one round is logged, not fatal."""
        while not self._stopped and (rounds is None or rounds > 0):
            try:
                with self.app.app_context():
                    self.work()
            except Exception:
                log.exception("the %s thread's round failed; the next round tries again", self.name)
            if rounds is not None:
                rounds -= 1
                if not rounds:
                    return
            self.wake.wait(self.poll_seconds)
            self.wake.clear()
