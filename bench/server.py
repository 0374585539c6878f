"""Server round trip: one render through the client against calling the renderer directly (256 px),
render_sequence throughput, the transport cost of a 512x512 raw frame on loopback, and how much a client
that never reads its replies delays another client's ping (and grows the server).
Targets: protocol overhead <= 10% of the generator's time at 256 px on CPU; <= 1 ms per 512x512 raw frame;
ping delay by a non-reading client <= 100 ms.

    python bench/server.py [--resolution 256] [--repeat 10]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import device_description, median_time, print_table, write_results  # noqa: E402
from pvp.avatar import Avatar, random_avatar  # noqa: E402
from pvp.serve.process import ServerProcess  # noqa: E402
from pvp.serve.render_service import FrameJob, RenderService  # noqa: E402
from pvp_contract import protocol  # noqa: E402
from pvp_contract.client import Client  # noqa: E402


def transport_ms(size: int = 512, repeat: int = 200) -> float:
    """Median time to move one raw RGBA frame (header + payload) server -> client over tcp loopback."""
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    payload = bytes(size * size * 4)
    dealer.send(protocol.request("ping", 0))
    peer, _ = router.recv_multipart()
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        router.send_multipart([peer, protocol.pack(protocol.frame_header(i, size, size, "rgba8")), payload], copy=False)
        header, data = dealer.recv_multipart(copy=False)
        protocol.unpack(header.bytes)
        memoryview(data.buffer)  # the client sees the bytes without copying them again
        times.append(time.perf_counter() - t0)
    router.close(0)
    dealer.close(0)
    return statistics.median(times) * 1e3


def ping_beside_a_hog(server: ServerProcess, controls: list[float], repeat: int = 50) -> dict:
    """Another client's ping times (median, max) before and while one client floods the server and never
    reads a reply (four 4096-frame 512 px RGBA sequences, thousands of hellos and renders), and the
    server's memory growth."""
    good = Client(server.endpoint, timeout_s=60)
    quiet = [good.ping() for _ in range(repeat)]
    rss = server.rss_bytes()
    hog = zmq.Context.instance().socket(zmq.DEALER)
    hog.setsockopt(zmq.LINGER, 0)
    hog.setsockopt(zmq.SNDHWM, 0)
    hog.connect(server.endpoint)
    for i in range(4):
        hog.send(protocol.request("render_sequence", 10 + i, frames=[controls] * 4096, format="rgba8", size=512))
    for i in range(5000):
        hog.send(protocol.request("hello" if i % 4 else "render", 100 + i, controls=controls, format="rgba8",
                                  size=512))
    time.sleep(1.0)
    loaded = [good.ping() for _ in range(repeat)]
    grown = server.rss_bytes() - rss
    hog.close(0)
    good.close()
    return {"quiet_ms": (statistics.median(quiet) * 1e3, max(quiet) * 1e3),
            "hog_ms": (statistics.median(loaded) * 1e3, max(loaded) * 1e3), "rss_mib": grown / 2**20}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        avatar_dir = Path(tmp) / "avatar"
        random_avatar(resolution=args.resolution).save(avatar_dir)
        service = RenderService(Avatar.load(avatar_dir), max_batch=16)
        defaults = [c["default"] for c in service.avatar.meta.schema["channels"]]
        job = FrameJob(defaults, {}, "rgb8", None, 90)
        direct_seq = median_time(lambda: service.render([job] * 32), warmup=1, repeat=max(2, args.repeat // 3))
        server = ServerProcess(avatar_dir, threads=None)
        try:
            client = Client(server.endpoint, timeout_s=120)
            client.hello()
            frames = [[v + 0.01 * i for v in defaults] for i in range(10_000)]
            service.render([job])
            client.render(frames[-1], use_cache=False)
            direct_times, via_times = [], []
            for i in range(args.repeat):  # alternate, so both see the same machine state
                t0 = time.perf_counter()
                service.render([job])
                direct_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                client.render(frames[i], use_cache=False)
                via_times.append(time.perf_counter() - t0)
            direct, via = statistics.median(direct_times), statistics.median(via_times)
            t0 = time.perf_counter()
            n = sum(1 for _ in client.render_sequence(frames[:32]))
            seq_time = time.perf_counter() - t0
            client.close()
            hog = ping_beside_a_hog(server, defaults)
        finally:
            server.stop()
    transport = transport_ms()
    rows = [
        {"measure": f"render {args.resolution}px direct (renderer)", "ms": round(direct * 1e3, 2)},
        {"measure": f"render {args.resolution}px through client + server", "ms": round(via * 1e3, 2)},
        {"measure": "protocol overhead", "ms": round((via - direct) * 1e3, 2),
         "share": f"{(via - direct) / direct:.1%}", "target": "<= 10%"},
        {"measure": "render_sequence 32 frames, per frame", "ms": round(seq_time / n * 1e3, 2),
         "fps": round(n / seq_time, 1)},
        {"measure": "direct batched 32 frames, per frame", "ms": round(direct_seq / 32 * 1e3, 2)},
        {"measure": "transport of a 512x512 RGBA frame on loopback", "ms": round(transport, 3), "target": "<= 1 ms"},
        {"measure": "ping, median / max (no other client)", "ms": " / ".join(f"{v:.2f}" for v in hog["quiet_ms"])},
        {"measure": "ping, median / max, beside a client that never reads",
         "ms": " / ".join(f"{v:.2f}" for v in hog["hog_ms"]),
         "share": f"+{hog['hog_ms'][1] - hog['quiet_ms'][1]:.1f} ms max", "target": "<= +100 ms"},
        {"measure": "server memory growth from that client", "ms": "", "share": f"{hog['rss_mib']:.0f} MiB"},
    ]
    desc = device_description("cpu")
    print(f"pvp server round trip on {desc}")
    print_table(rows, ["measure", "ms", "share", "fps", "target"])
    print(f"written to {write_results('server', desc, rows, args.out)}")


if __name__ == "__main__":
    main()
