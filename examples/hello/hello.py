"""Serve a greeting on http://localhost:8080 (PORT overrides); ``--check`` prints it and exits."""

import http.server
import os
import socket
import sys


def greeting() -> str:
    return f"hello from devyard, on {socket.gethostname()}\n"


class Greeter(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = greeting().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    if "--check" in sys.argv[1:]:
        sys.stdout.write(greeting())
        return
    port = int(os.environ.get("PORT", "8080"))
    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Greeter)
    print(f"serving on http://localhost:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
