"""A small JSON server for examples/http-matrix.yaml: ``GET /forecast/CITY?unit=c|f``.

Usage: ``python3 examples/http_server.py [PORT]`` (default 8099; 127.0.0.1 only).
"""

from __future__ import annotations

import json
import sys
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Forecast(BaseHTTPRequestHandler):
    """Answers ``/forecast/CITY`` with a made-up, stable temperature."""

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "forecast":
            self.send_error(404, "try /forecast/CITY?unit=c")
            return
        city, unit = parts[1], parse_qs(url.query).get("unit", ["c"])[0]
        celsius = zlib.crc32(city.encode()) % 35
        temp = celsius if unit == "c" else round(celsius * 9 / 5 + 32)
        body = json.dumps({"city": city, "unit": unit, "temp": temp}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return


def serve(port: int) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:``port`` (0: any free port), not yet serving."""
    return ThreadingHTTPServer(("127.0.0.1", port), Forecast)


if __name__ == "__main__":
    server = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 8099)
    print(f"serving on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
