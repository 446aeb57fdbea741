"""The reference echo server for the benchmark: picows on asyncio, no framework, no uWSGI.

It echoes every message on any WebSocket path, keeping its type: the same work the apps'
/ws/echo does, with nothing else around it.

    python bench/reference_server.py PORT
"""
import asyncio
import sys

from picows import WSListener, WSMsgType, ws_create_server


class Echo(WSListener):
    def on_ws_frame(self, transport, frame):
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            transport.send(frame.msg_type, frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


async def main(port):
    server = await ws_create_server(lambda request: Echo(), "127.0.0.1", port)
    print(f"reference server: listening on 127.0.0.1:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
