"""Real HTTP servers on loopback, in threads, for tests that need real sockets."""

import contextlib
import threading

from werkzeug.serving import make_server


@contextlib.contextmanager
def serve(wsgi_app):
    """Serve `wsgi_app` on 127.0.0.1 with a threaded HTTP/1.1 server; yield its base URL."""
    server = make_server("127.0.0.1", 0, wsgi_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
