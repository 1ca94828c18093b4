"""A webhook receiver on loopback for the webhook tests."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from shared.webhooks import SIGNATURE_HEADER


class Receiver:
    """An HTTP receiver on 127.0.0.1 that records deliveries; ``mode`` is ok, fail (503) or trickle."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.received: list[dict] = []
        self.active = 0
        self.max_active = 0
        self.release = threading.Event()  # ends a trickling answer early
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                with receiver._lock:
                    receiver.active += 1
                    receiver.max_active = max(receiver.max_active, receiver.active)
                try:
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                    receiver.received.append(
                        {
                            "body": body,
                            "signature": self.headers[SIGNATURE_HEADER],
                            "host": self.headers["Host"],
                            "headers": dict(self.headers),
                        }
                    )
                    if receiver.mode == "trickle":  # the status line, one byte at a time
                        for byte in b"HTTP/1.1 200 OK\r\n\r\n" * 10:
                            if receiver.release.wait(0.5):
                                break
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                        return
                    self.send_response(503 if receiver.mode == "fail" else 200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the sender hung up (its deadline)
                finally:
                    with receiver._lock:
                        receiver.active -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def read_row(rt, model, job_id):
    """A job's row, detached from its session."""
    with rt.sessions() as session:
        row = session.get(model, job_id)
        session.expunge(row)
        return row
