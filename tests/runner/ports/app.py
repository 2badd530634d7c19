"""A small application for the port proxy's tests, run inside an environment (a fake runtime's host process).

It listens on two loopback ports and prints them, space-separated, on one line:

- HTTP: ``/headers`` answers the request's head as JSON (what the application sees); ``/stream`` answers a chunked
  response whose first chunk comes at once and whose second comes only once ``/release`` was asked for; anything
  else answers ``hello from PATH``.
- WebSocket: echoes every message.
"""

from __future__ import annotations

import asyncio
import json
import sys

from websockets.asyncio.server import ServerConnection, serve

RELEASED = asyncio.Event()


async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    request_line, *lines = head[:-4].split("\r\n")
    method, target, _ = request_line.split(" ")
    headers = [line.split(": ", 1) for line in lines]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
    body = await reader.readexactly(length) if length else b""
    path = target.partition("?")[0]
    if path == "/headers":
        answer = json.dumps({"method": method, "target": target, "headers": headers, "body": body.decode()}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer)
    elif path == "/stream":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"6\r\nfirst\n\r\n")
        await writer.drain()
        await RELEASED.wait()
        writer.write(b"7\r\nsecond\n\r\n0\r\n\r\n")
    elif path == "/release":
        RELEASED.set()
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    else:
        answer = f"hello from {target}\n".encode()
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(answer)}\r\n\r\n".encode() + answer)
    await writer.drain()
    writer.close()


async def echo(connection: ServerConnection) -> None:
    async for message in connection:
        await connection.send(message)


async def main() -> None:
    server = await asyncio.start_server(http, "127.0.0.1", 0)
    async with serve(echo, "127.0.0.1", 0) as websocket_server:
        ports = [server.sockets[0].getsockname()[1], next(iter(websocket_server.sockets)).getsockname()[1]]
        print(*ports, flush=True)
        sys.stdout.close()
        await asyncio.Event().wait()


asyncio.run(main())
