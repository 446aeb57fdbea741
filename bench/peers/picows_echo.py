"""The picows peer: picows on asyncio, no framework, no uWSGI, at its defaults (it sends no
keep-alive pings unless enable_auto_ping is set).

It echoes every message on any WebSocket path, keeping its type: the same work the apps'
/ws/echo does, with nothing else around it.

    python bench/peers/picows_echo.py PORT
"""
import asyncio
import inspect
import sys

import picows
from picows import WSListener, WSMsgType, ws_create_server

from ready import announce


class Echo(WSListener):
    def on_ws_frame(self, transport, frame):
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            transport.send(frame.msg_type, frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


async def main(port):
    server = await ws_create_server(lambda request: Echo(), "127.0.0.1", port)
    defaults = inspect.signature(ws_create_server).parameters
    pings = defaults["enable_auto_ping"].default
    announce("picows", port, picows.__version__,
             ping_interval=defaults["auto_ping_idle_timeout"].default if pings else None,
             settings={name: defaults[name].default for name in
                       ("enable_auto_ping", "auto_ping_idle_timeout", "max_frame_size")},
             loop=type(asyncio.get_running_loop()).__module__)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
