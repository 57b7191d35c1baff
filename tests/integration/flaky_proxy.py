"""A flaky TCP path for the resumable-upload tests and scripts/bench-resumable: listens on a free port of
127.0.0.1, forwards each connection to the target, and cuts it after a random number of bytes from the client
(drawn per connection from [cut_min, cut_max] by a seeded random.Random, so a seed gives the same cut points).
Stdlib only (asyncio on a thread of its own), usable as a context manager:

    with FlakyProxy("127.0.0.1", server.port, seed=7, cut_min=2 << 20, cut_max=24 << 20) as proxy:
        ... connect to proxy.port ...
    proxy.cuts, proxy.bytes_from_client, proxy.connections

A cut forwards the client's bytes up to the drawn count, then resets both sides (RST, like a dropped link), or
with server_side="hang" resets the client and leaves the server's connection open and silent until the proxy
stops (the dead connection a server has not noticed yet). After max_cuts cuts the proxy forwards without
cutting. Run as a script it proxies until interrupted:

    python3 tests/integration/flaky_proxy.py --target 127.0.0.1:8000 [--listen PORT] [--seed S]
                                             [--cut-min BYTES] [--cut-max BYTES] [--max-cuts N]
"""
import argparse
import asyncio
import random
import socket
import struct
import sys
import threading

READ_BYTES = 64 * 1024


def _reset(writer):
    """Closes with RST (SO_LINGER 0) rather than FIN: the peer sees a dropped connection, not an end of body."""
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class FlakyProxy:
    def __init__(self, target_host, target_port, seed=1, cut_min=1 << 20, cut_max=16 << 20, max_cuts=None,
                 listen_port=0, server_side="reset"):
        if not 0 < cut_min <= cut_max:
            raise ValueError("need 0 < cut_min <= cut_max")
        if server_side not in ("reset", "hang"):
            raise ValueError("server_side: reset or hang")
        self.target = (target_host, int(target_port))
        self.rng = random.Random(seed)
        self.cut_min, self.cut_max, self.max_cuts = cut_min, cut_max, max_cuts
        self.server_side = server_side
        self.host = "127.0.0.1"
        self.port = listen_port
        self.connections = 0
        self.cuts = 0
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.cut_points = []   # bytes of the client forwarded on each cut connection
        self._lock = threading.Lock()
        self._loop = None
        self._server = None
        self._thread = None
        self._ready = threading.Event()
        self._error = None
        self._hanging = []

    # ------------------------------------------------------------------ life cycle
    def start(self):
        self._thread = threading.Thread(target=self._run, name="flaky-proxy", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        if not self._ready.is_set():
            raise RuntimeError("flaky proxy did not start")
        return self

    def stop(self):
        if self._loop is None:
            return
        loop = self._loop

        async def shutdown():
            self._server.close()
            for w in self._hanging:
                w.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        except Exception:  # noqa: BLE001 - the loop may be gone already
            pass
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def stats(self):
        with self._lock:
            return {"connections": self.connections, "cuts": self.cuts, "bytes_from_client": self.bytes_from_client,
                    "bytes_to_client": self.bytes_to_client, "cut_points": list(self.cut_points)}

    # ------------------------------------------------------------------ the loop
    def _run(self):
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            self._loop = loop
        except Exception as e:  # noqa: BLE001 - handed to start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _draw_budget(self):
        with self._lock:
            self.connections += 1
            if self.max_cuts is not None and self.cuts >= self.max_cuts:
                return None
            return self.rng.randint(self.cut_min, self.cut_max)

    async def _handle(self, creader, cwriter):
        budget = self._draw_budget()
        try:
            sreader, swriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.transport.abort()
            return
        cut = asyncio.Event()

        async def client_to_server():
            forwarded = 0
            try:
                while True:
                    data = await creader.read(READ_BYTES)
                    if not data:
                        swriter.write_eof()
                        return
                    if budget is not None and forwarded + len(data) >= budget:
                        data = data[:budget - forwarded]
                        swriter.write(data)
                        await swriter.drain()
                        forwarded += len(data)
                        with self._lock:
                            self.bytes_from_client += len(data)
                            self.cuts += 1
                            self.cut_points.append(forwarded)
                        cut.set()
                        return
                    swriter.write(data)
                    await swriter.drain()
                    forwarded += len(data)
                    with self._lock:
                        self.bytes_from_client += len(data)
            except (OSError, asyncio.IncompleteReadError):
                cut.set()

        async def server_to_client():
            try:
                while True:
                    data = await sreader.read(READ_BYTES)
                    if not data:
                        cwriter.write_eof()
                        return
                    cwriter.write(data)
                    await cwriter.drain()
                    with self._lock:
                        self.bytes_to_client += len(data)
            except OSError:
                cut.set()

        up = asyncio.ensure_future(client_to_server())
        down = asyncio.ensure_future(server_to_client())
        waiter = asyncio.ensure_future(cut.wait())
        both = asyncio.gather(up, down, return_exceptions=True)
        try:
            await asyncio.wait({waiter, both}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (up, down, waiter, both):
                t.cancel()
            await asyncio.gather(up, down, waiter, both, return_exceptions=True)
            if not cut.is_set():
                cwriter.close()
                swriter.close()
            elif self.server_side == "hang":
                _reset(cwriter)
                self._hanging.append(swriter)
            else:
                _reset(cwriter)
                _reset(swriter)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--listen", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cut-min", type=int, default=1 << 20)
    ap.add_argument("--cut-max", type=int, default=16 << 20)
    ap.add_argument("--max-cuts", type=int, default=None)
    ap.add_argument("--server-side", choices=("reset", "hang"), default="reset")
    a = ap.parse_args()
    host, _, port = a.target.rpartition(":")
    proxy = FlakyProxy(host or "127.0.0.1", int(port), seed=a.seed, cut_min=a.cut_min, cut_max=a.cut_max,
                       max_cuts=a.max_cuts, listen_port=a.listen, server_side=a.server_side)
    proxy.start()
    print(f"flaky proxy 127.0.0.1:{proxy.port} -> {a.target}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        print(proxy.stats(), file=sys.stderr)


if __name__ == "__main__":
    main()
