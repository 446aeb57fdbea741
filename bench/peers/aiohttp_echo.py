"""The aiohttp peer: aiohttp.web's WebSocketResponse at its defaults, under web.run_app
(asyncio's own event loop, as aiohttp chooses none). Its default heartbeat is None: it sends
no keep-alive pings and answers the client's.

    python bench/peers/aiohttp_echo.py PORT
"""
import asyncio
import inspect
import sys

import aiohttp
from aiohttp import WSMsgType, web

from ready import announce


async def echo(request):
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            await ws.send_str(message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


def main(port):
    app = web.Application()
    app.add_routes([web.get("/ws/echo", echo)])
    defaults = inspect.signature(web.WebSocketResponse).parameters
    heartbeat = defaults["heartbeat"].default

    # run_app calls `print` once its site is listening: that is the readiness line.
    def ready(_banner):
        announce("aiohttp", port, aiohttp.__version__, ping_interval=heartbeat,
                 settings={name: defaults[name].default for name in ("heartbeat", "autoping", "max_msg_size",
                                                                      "compress")},
                 loop=type(asyncio.get_running_loop()).__module__)

    web.run_app(app, host="127.0.0.1", port=port, print=ready)


if __name__ == "__main__":
    main(int(sys.argv[1]))
