"""Bench: RolloutGroups with realistic routing payloads through encode -> send -> receive -> decode.

    minirl-async bench codec [--quick] --json

Each group has G responses of R tokens to a P-token prompt, with routes [P+R-1, 48 layers, top-8] uint8
(Qwen3-30B-A3B-like), float32 logprobs and int32 ids/versions. A sender thread encodes and sends over a
loopback PUSH -> PULL (ipc), the main thread receives and decodes (strict checks included). Baseline in
the same run: the same frames, pre-encoded, sent and received raw (no encode, no decode). Figures:
response tokens/s of both, wire bytes per response token, and `ratio` = codec / raw tokens/s (the share of
raw transport speed the codec keeps).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid

import numpy as np

NUM_LAYERS, TOP_K, NUM_EXPERTS = 48, 8, 128


def _group(rng: np.random.Generator, index: int, G: int, P: int, R: int):  # -> RolloutGroup
    from minirl_async.proto.messages import Response, RolloutGroup

    responses = [
        Response(response_ids=rng.integers(0, 151_000, R, dtype=np.int32),
                 logprobs=-rng.random(R, dtype=np.float32) * 3,
                 versions=np.full(R, 12, np.int32),
                 routes=rng.integers(0, NUM_EXPERTS, (P + R - 1, NUM_LAYERS, TOP_K), dtype=np.uint8),
                 finish_reason="length")
        for _ in range(G)
    ]
    return RolloutGroup(group_id=f"g{index}", attempt=0, prompt_ids=rng.integers(0, 151_000, P, dtype=np.int32),
                        meta={"answer": "42"}, sampler_id="s0", responses=responses, timings={"generate_s": 1.0})


def _pipe(addr: str, send_one, recv_one, n: int) -> float:
    import zmq

    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for s in (push, pull):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 4)
        s.setsockopt(zmq.RCVHWM, 4)
    pull.bind(addr)
    push.connect(addr)

    def sender() -> None:
        for i in range(n):
            send_one(push, i)

    t0 = time.perf_counter()
    th = threading.Thread(target=sender, daemon=True)
    th.start()
    for _ in range(n):
        recv_one(pull.recv_multipart(copy=False))
    elapsed = time.perf_counter() - t0
    th.join()
    push.close(0)
    pull.close(0)
    ctx.term()
    return elapsed


def run(quick: bool) -> dict:
    import torch

    from minirl_async.proto.codec import decode, encode

    torch.set_num_threads(1)
    G, P, R = 8, 256, 4096
    num_groups = 4 if quick else 24
    rng = np.random.default_rng(0)
    distinct = [_group(rng, i, G, P, R) for i in range(4)]
    groups = [distinct[i % 4] for i in range(num_groups)]
    tokens = sum(g.num_response_tokens for g in groups)
    pre = [encode(g) for g in distinct]
    wire_bytes = sum(sum(memoryview(f).nbytes for f in pre[i % 4]) for i in range(num_groups))

    decoded: list[int] = []

    def codec_recv(frames):
        decoded.append(decode(frames).num_response_tokens)

    def addr() -> str:
        return f"ipc://{tempfile.gettempdir()}/minirl-codec-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"

    best_codec = best_raw = float("inf")
    reps = 9  # interleaved, best of each: the machine is shared, single runs are noisy
    for r in range(reps):
        def raw() -> float:
            return _pipe(addr(), lambda s, i: s.send_multipart(pre[i % 4], copy=False), lambda frames: None,
                         num_groups)

        def codec() -> float:
            return _pipe(addr(), lambda s, i: s.send_multipart(encode(groups[i]), copy=False), codec_recv,
                         num_groups)
        # alternate which goes first: in a fixed order the second run of a round is systematically faster
        if r % 2:
            best_codec = min(best_codec, codec())
            best_raw = min(best_raw, raw())
        else:
            best_raw = min(best_raw, raw())
            best_codec = min(best_codec, codec())
    assert sum(decoded) == reps * tokens
    codec_tps, raw_tps = tokens / best_codec, tokens / best_raw
    return {
        "bench": "codec",
        "groups": num_groups,
        "group_size": G,
        "prompt_tokens": P,
        "response_tokens": R,
        "layers": NUM_LAYERS,
        "top_k": TOP_K,
        "transport": "ipc",
        "tokens_per_s": round(codec_tps),
        "raw_tokens_per_s": round(raw_tps),
        "bytes_per_token": round(wire_bytes / tokens, 1),
        "codec_gbps": round(wire_bytes / best_codec / 1e9, 3),
        "ratio": round(codec_tps / raw_tps, 3),
    }
