"""Bench: stream a bf16 state dict learner -> sampler over loopback (tcp and ipc), end to end.

    minirl-async bench weightsync [--quick] --json

End to end = plan + serialise into safetensors chunks (the header copied, each 8 MiB tensor a zero-copy
segment viewing the state, as the learner sends its own tensors) + checksum + XPUB send -> SUB receive in a
separate process (spawned, so it shares nothing) + checksum verify + blob parse + tensor-set check +
assembly, timed from the first serialisation to the receiver's acknowledgement that the whole version is
in. Baseline in the same run: a single-process memcpy of the same tensors into preallocated buffers
(`copy_`, one thread). `ratio` = transport GB/s / memcpy GB/s for the better transport (`ratio_of` says
which); `tcp_ratio` and `ipc_ratio` are both reported, beside `bare_socket_ratio`: the same bytes through a
bare Unix socket pair (no zmq, no checksums, no framing), the ceiling of any socket transport on this
machine; `*_cpu_ratio` compares CPU seconds (memcpy's against sender + receiver, all threads) instead of
wall time. Each
figure is the best of `reps` runs; the 1-minute load average is reported because the 2-core machine is
shared.
Default ~256 MB (quick: ~16 MB, a smoke test only: source and copy fit this CPU's L3, so its memcpy runs
~1.7x faster than at full size, and one chunk cannot overlap sending with serialising; compare full runs),
chunks of `network.weight_chunk_mb` (16 MB).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import tempfile
import time
import uuid
from typing import Any

import torch

_TENSOR_SHAPE = (2048, 2048)  # 8 MiB of bf16 per tensor


def _state(total_bytes: int) -> dict[str, torch.Tensor]:
    n = max(1, total_bytes // (_TENSOR_SHAPE[0] * _TENSOR_SHAPE[1] * 2))
    g = torch.Generator().manual_seed(0)
    return {f"model.layers.{i}.mlp.experts.{i % 8}.up_proj.weight": torch.randn(_TENSOR_SHAPE, generator=g)
            .to(torch.bfloat16) for i in range(n)}


def _receiver(addr: str, names: list[str], reps: int, conn: Any) -> None:
    """Child process: assemble `reps` versions, acknowledge each over the pipe."""
    import zmq

    from minirl_async.proto.codec import decode
    from minirl_async.proto.sockets import SocketOptions, weights_sub
    from minirl_async.proto.weights import WeightReceiver

    torch.set_num_threads(1)
    ctx = zmq.Context()
    sub = weights_sub(ctx, addr, "bench", SocketOptions(linger_ms=0, weights_hwm=8))
    receiver = WeightReceiver(expected_names=names)
    conn.send("ready")
    done, cpu0 = 0, time.process_time()
    while done < reps:
        frames = sub.recv_multipart(copy=False)
        out = receiver.feed(decode(frames[1:]))  # frames[0] is the topic
        if out is not None:
            cpu = time.process_time()  # all threads of this process, zmq's I/O thread included
            conn.send((out.version, sum(t.numel() * t.element_size() for t in out.tensors.values()), cpu - cpu0))
            done, cpu0 = done + 1, cpu
    sub.close(0)
    ctx.term()


def _transport(addr: str, state: dict[str, torch.Tensor], chunk_bytes: int, reps: int
               ) -> tuple[float, int, float, float]:
    """Best seconds for one version end to end, the number of chunks, and the CPU seconds the sender and
    the receiver process spent on that best run."""
    import zmq

    from minirl_async.proto.sockets import BROADCAST_TOPIC, SocketOptions, send_message, weights_pub
    from minirl_async.proto.weights import WeightSender

    ctx = zmq.Context()
    pub = weights_pub(ctx, addr, SocketOptions(linger_ms=0, weights_hwm=8))
    spawn = mp.get_context("spawn")
    parent, child = spawn.Pipe()
    proc = spawn.Process(target=_receiver, args=(addr, list(state), reps, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(120) or parent.recv() != "ready":
            raise RuntimeError("bench receiver did not start")
        # Handshake: wait for the subscriber's broadcast subscription (XPUB event) before sending.
        pub.setsockopt(zmq.RCVTIMEO, 60_000)
        while pub.recv() != b"\x01" + BROADCAST_TOPIC:
            pass
        sender = WeightSender(chunk_bytes)
        best, num_chunks, cpu = float("inf"), 0, (0.0, 0.0)
        for version in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            num_chunks = 0
            for msg in sender.publish(version, lambda: state.items()):
                send_message(pub, msg, topic=BROADCAST_TOPIC)
                num_chunks += 1
            if not parent.poll(300):
                raise RuntimeError("bench receiver did not acknowledge")
            got_version, nbytes, receiver_cpu = parent.recv()
            elapsed = time.perf_counter() - t0
            if elapsed < best:
                best, cpu = elapsed, (time.process_time() - c0, receiver_cpu)
            assert got_version == version and nbytes == sum(t.numel() * 2 for t in state.values())
        return best, num_chunks, cpu[0], cpu[1]
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        pub.close(0)
        ctx.term()


def _memcpy(state: dict[str, torch.Tensor], reps: int) -> tuple[float, float]:
    """Best wall seconds and best CPU seconds of copying the state into touched buffers."""
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    for k, v in state.items():  # touch the pages once: the baseline is the copy, not page faults
        dst[k].copy_(v)
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for k, v in state.items():
            dst[k].copy_(v)
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def _bare_socket(state: dict[str, torch.Tensor], reps: int) -> float:
    """Best seconds to push the same bytes through a bare Unix stream socket pair (a thread writes, this
    thread reads into a preallocated, already touched buffer; no zmq, no checksum, no framing): the kernel's
    two copies alone, i.e. a ceiling for any socket transport on this machine."""
    import threading

    src = [t.view(-1).view(torch.uint8).numpy() for t in state.values()]
    total = sum(a.nbytes for a in src)
    dst = memoryview(bytearray(total))
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def write() -> None:
        for _ in range(reps):
            for x in src:
                a.sendall(x)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    best = float("inf")
    try:
        for _ in range(reps):
            t0, got = time.perf_counter(), 0
            while got < total:
                got += b.recv_into(dst[got:], total - got)
            best = min(best, time.perf_counter() - t0)
    finally:
        writer.join(30)
        a.close()
        b.close()
    return best


def run(quick: bool) -> dict:
    from minirl_async.config import NetworkSection
    from minirl_async.proto.stblob import default_checksum_algo

    torch.set_num_threads(1)
    reps = 7  # best of: the machine is shared, single runs are noisy
    state = _state((16 if quick else 256) << 20)
    total = sum(t.numel() * t.element_size() for t in state.values())
    chunk_bytes = int(NetworkSection().weight_chunk_mb * (1 << 20))
    memcpy_s, memcpy_cpu_s = _memcpy(state, 2 * reps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        tcp_addr = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ipc_addr = f"ipc://{tempfile.gettempdir()}/minirl-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
    tcp_s, num_chunks, tcp_cpu_send, tcp_cpu_recv = _transport(tcp_addr, state, chunk_bytes, reps)
    ipc_s, _, ipc_cpu_send, ipc_cpu_recv = _transport(ipc_addr, state, chunk_bytes, reps)
    bare_s = _bare_socket(state, reps)
    gb = total / 1e9
    memcpy_gbps, tcp_gbps, ipc_gbps = gb / memcpy_s, gb / tcp_s, gb / ipc_s
    best = "ipc" if ipc_gbps >= tcp_gbps else "tcp"
    return {
        "bench": "weightsync",
        "bytes": total,
        "num_chunks": num_chunks,
        "chunk_mb": chunk_bytes / (1 << 20),
        "checksum": default_checksum_algo(),
        "reps": reps,
        "memcpy_gbps": round(memcpy_gbps, 3),
        "tcp_gbps": round(tcp_gbps, 3),
        "ipc_gbps": round(ipc_gbps, 3),
        "tcp_ratio": round(tcp_gbps / memcpy_gbps, 3),
        "ipc_ratio": round(ipc_gbps / memcpy_gbps, 3),
        "ratio": round(max(tcp_gbps, ipc_gbps) / memcpy_gbps, 3),
        "ratio_of": best,
        # the same bytes through a bare Unix socket pair (no zmq, no checksums): the kernel's ceiling here
        "bare_socket_gbps": round(gb / bare_s, 3),
        "bare_socket_ratio": round(gb / bare_s / memcpy_gbps, 3),
        "tcp_s": round(tcp_s, 4),
        "ipc_s": round(ipc_s, 4),
        # CPU seconds (all threads) of sender and receiver in the best run: their sum over the wall time
        # shows how CPU-bound the two processes are on this 2-core machine.
        "tcp_cpu_s": [round(tcp_cpu_send, 3), round(tcp_cpu_recv, 3)],
        "ipc_cpu_s": [round(ipc_cpu_send, 3), round(ipc_cpu_recv, 3)],
        # memcpy CPU seconds / transport CPU seconds (both processes): less sensitive to a busy machine.
        "tcp_cpu_ratio": round(memcpy_cpu_s / max(tcp_cpu_send + tcp_cpu_recv, 1e-9), 3),
        "ipc_cpu_ratio": round(memcpy_cpu_s / max(ipc_cpu_send + ipc_cpu_recv, 1e-9), 3),
        "load_avg_1min": round(os.getloadavg()[0], 2),  # other processes on the machine during the run
    }
