"""The websockets peer: the websockets library's asyncio serve() at its defaults (a ping every
ping_interval seconds, the connection closed when its pong is ping_timeout late; the
permessage-deflate offer the bench's client does not take up).

    python bench/peers/websockets_echo.py PORT
"""
import asyncio
import inspect
import sys

import websockets
from websockets.asyncio.server import serve

from ready import announce


async def echo(websocket):
    async for message in websocket:
        await websocket.send(message)


async def main(port):
    async with serve(echo, "127.0.0.1", port) as server:
        defaults = inspect.signature(serve).parameters
        announce("websockets", port, websockets.__version__, ping_interval=defaults["ping_interval"].default,
                 settings={name: defaults[name].default for name in ("ping_interval", "ping_timeout", "max_size",
                                                                      "max_queue", "write_limit", "compression")},
                 loop=type(asyncio.get_running_loop()).__module__)
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
