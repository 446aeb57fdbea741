"""The uvicorn peer: a Starlette WebSocket route under uvicorn at its defaults, one process.
With uvicorn[standard] installed, "auto" picks uvloop, httptools and the websockets library;
the readiness line says which classes are in effect. uvicorn pings every ws_ping_interval
seconds and closes a connection whose pong is ws_ping_timeout late.

    python bench/peers/uvicorn_echo.py PORT
"""
import asyncio
import sys

import starlette
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute

from ready import announce


async def echo(websocket):
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await websocket.send_text(message["text"])
        else:
            await websocket.send_bytes(message["bytes"])


app = Starlette(routes=[WebSocketRoute("/ws/echo", echo)])


class Server(uvicorn.Server):
    """uvicorn's server, announcing itself once startup() has bound its socket."""

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.should_exit:  # startup failed (the port taken): uvicorn exits, nothing to announce
            return
        config = self.config
        announce("uvicorn", config.port, f"uvicorn {uvicorn.__version__}, starlette {starlette.__version__}",
                 ping_interval=config.ws_ping_interval,
                 settings={"ws_ping_interval": config.ws_ping_interval, "ws_ping_timeout": config.ws_ping_timeout,
                           "ws_max_size": config.ws_max_size, "ws_per_message_deflate": config.ws_per_message_deflate,
                           "http": f"{config.http_protocol_class.__module__}.{config.http_protocol_class.__name__}",
                           "ws": f"{config.ws_protocol_class.__module__}.{config.ws_protocol_class.__name__}"},
                 loop=type(asyncio.get_running_loop()).__module__)


if __name__ == "__main__":
    Server(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]))).run()
