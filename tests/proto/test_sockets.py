"""Sockets on loopback (tcp and ipc): the receive loop survives bad messages, the work channel routes by
sampler id, weights stream end to end with the XPUB handshake (late joiner, bad chunk, older chunk), and
CurveZMQ keeps out unauthenticated clients. Every wait is bounded."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tracemalloc

import msgpack
import pytest
import torch
import zmq
import zmq.asyncio
from minirl_async.proto.codec import MAX_FRAMES, decode, encode
from minirl_async.proto.keys import main as keys_main
from minirl_async.proto.messages import (
    PROTO_VERSION,
    Heartbeat,
    ProtocolError,
    WeightsRequest,
    WeightUpdate,
    WorkGrant,
    WorkRequest,
)
from minirl_async.proto.sockets import (
    BROADCAST_TOPIC,
    ChannelStats,
    CurveConfig,
    SocketOptions,
    WeightPublisher,
    receive_loop,
    recv_bounded,
    scored_pull,
    scored_push,
    send_message,
    start_authenticator,
    weights_pub,
    weights_sub,
    work_dealer,
    work_router,
)
from minirl_async.proto.weights import WeightReceiver, WeightSender

OPTS = SocketOptions(linger_ms=0, heartbeat_s=0.5)


async def _until(cond, timeout=10.0):
    async def wait():
        while not cond():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(wait(), timeout)


@contextlib.asynccontextmanager
async def _task(coro):
    t = asyncio.create_task(coro)
    try:
        yield t
    finally:
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
async def test_receive_loop_counts_bad_messages_and_keeps_serving(transport, tcp_addr, ipc_addr, caplog):
    addr = tcp_addr if transport == "tcp" else ipc_addr
    ctx = zmq.asyncio.Context()
    pull, push = scored_pull(ctx, addr, OPTS), scored_push(ctx, addr, OPTS)
    got, stats = [], ChannelStats()

    def handle(msg, peer):
        got.append(msg)

    try:
        async with _task(receive_loop(pull, handle, stats=stats, max_bytes=1 << 20)):
            await push.send_multipart([b"\xc1garbage"])
            await send_message(push, Heartbeat(sender="g0", role="grader", seq=1, time_s=0.0))
            await push.send_multipart([msgpack.packb({"proto": PROTO_VERSION + 7, "type": "Heartbeat"})])
            await push.send_multipart([b"x" * 10, b"y" * (2 << 20)])  # over max_bytes
            await send_message(push, WorkRequest(sampler_id="s9", free_slots=1, weight_version=0))
            await _until(lambda: len(got) == 2 and stats.errors == 3)
        assert [m.TYPE for m in got] == ["Heartbeat", "WorkRequest"]
        assert stats.received == 2 and stats.by_type == {"Heartbeat": 1, "WorkRequest": 1}
        assert "exceeds the limit" in stats.last_error
        logged = [r.getMessage() for r in caplog.records if r.name == "minirl_async.proto"]
        assert len(logged) == 3 and "protocol version mismatch" in logged[1] and "(3 so far)" in logged[2]
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("envelope", ["none", "identity"])
async def test_receive_loop_bounds_whole_messages_not_only_frames(ipc_addr, envelope):
    # MAXMSGSIZE bounds each frame; a message of very many frames, or of many frames that are each under the
    # limit, must be dropped without being kept whole, counted, logged in one short line, and the loop must
    # go on with the next message.
    ctx = zmq.asyncio.Context()
    pull = (work_router if envelope == "identity" else scored_pull)(ctx, ipc_addr, OPTS)
    push = (work_dealer(ctx, ipc_addr, "s7", OPTS) if envelope == "identity" else scored_push(ctx, ipc_addr, OPTS))
    got, stats = [], ChannelStats()
    header = encode(Heartbeat(sender="x", role="r", seq=0, time_s=0.0))[0]
    try:
        async with _task(receive_loop(pull, lambda m, p: got.append((m, p)), envelope=envelope, stats=stats,
                                      max_bytes=1 << 20)):
            await push.send_multipart([header] + [b""] * MAX_FRAMES)   # one frame too many
            await push.send_multipart([header] + [b"y" * (400 << 10)] * 3)   # 1.2 MB in frames of 400 kB
            await send_message(push, WorkRequest(sampler_id="s7", free_slots=1, weight_version=0))
            await _until(lambda: len(got) == 1 and stats.errors == 2)
        assert got[0][0].TYPE == "WorkRequest" and got[0][1] == (b"s7" if envelope == "identity" else None)
        assert stats.received == 1 and stats.by_type == {"WorkRequest": 1}
        assert "exceeds the limit of 1048576 bytes" in stats.last_error and f"dropped its {4 + (envelope != 'none')} frames" in stats.last_error
    finally:
        ctx.destroy(linger=0)


async def test_recv_bounded_drains_a_refused_message_and_keeps_the_next(ipc_addr):
    ctx = zmq.asyncio.Context()
    pull, push = scored_pull(ctx, ipc_addr, OPTS), scored_push(ctx, ipc_addr, OPTS)
    try:
        await push.send_multipart([b"a"] * 11)
        await push.send_multipart([b"b"] * 10)
        with pytest.raises(ProtocolError, match="exceeds the limit of 10 frames; dropped its 11 frames"):
            await asyncio.wait_for(recv_bounded(pull, max_bytes=100, max_frames=10), 10)
        assert [f.bytes for f in await asyncio.wait_for(recv_bounded(pull, max_bytes=100, max_frames=10), 10)] == [b"b"] * 10
        await push.send_multipart([b""] * 100_000)   # recv_multipart would hold 100k frames (~40 MB) at once
        await send_message(push, Heartbeat(sender="x", role="r", seq=0, time_s=0.0))
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError, match="dropped its 100000 frames"):
                await asyncio.wait_for(recv_bounded(pull, max_bytes=100, max_frames=10), 10)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, f"refusing 100k frames peaked at {peak >> 10} KiB"
        assert decode(await asyncio.wait_for(recv_bounded(pull, max_bytes=100), 10)).TYPE == "Heartbeat"
    finally:
        ctx.destroy(linger=0)


async def test_handler_protocol_errors_are_counted_too(ipc_addr):
    ctx = zmq.asyncio.Context()
    pull, push = scored_pull(ctx, ipc_addr, OPTS), scored_push(ctx, ipc_addr, OPTS)
    receiver, stats, ok = WeightReceiver(version=5), ChannelStats(), []
    try:
        async with _task(receive_loop(pull, lambda m, p: ok.append(receiver.feed(m)) if m.TYPE == "WeightUpdate" else None,
                                       stats=stats)):
            msgs = list(WeightSender(1 << 20).publish(3, lambda: {"a": torch.ones(3)}.items()))
            await send_message(push, msgs[0])  # version 3 < applied 5: the handler raises ProtocolError
            await send_message(push, Heartbeat(sender="x", role="r", seq=0, time_s=0.0))
            await _until(lambda: stats.received == 2)
        assert stats.errors == 1 and "version 5 is already applied" in stats.last_error
    finally:
        ctx.destroy(linger=0)


async def test_work_channel_routes_by_sampler_id(tcp_addr):
    ctx = zmq.asyncio.Context()
    router = work_router(ctx, tcp_addr, OPTS)
    dealers = {sid: work_dealer(ctx, tcp_addr, sid, OPTS) for sid in ("s0", "s1")}
    seen = []

    async def handle(msg, peer):
        seen.append((peer, msg.sampler_id))
        await send_message(router, WorkGrant(backoff_s=0.1 + len(seen)), identity=peer)

    try:
        async with _task(receive_loop(router, handle, envelope="identity")):
            for sid, d in dealers.items():
                await send_message(d, WorkRequest(sampler_id=sid, free_slots=2, weight_version=-1))
            replies = {}
            for sid, d in dealers.items():
                replies[sid] = decode(await asyncio.wait_for(d.recv_multipart(copy=False), 10))
        assert sorted(seen) == [(b"s0", "s0"), (b"s1", "s1")]
        assert all(isinstance(r, WorkGrant) and r.backoff_s > 0 for r in replies.values())
        with pytest.raises(zmq.ZMQError):  # ROUTER_MANDATORY: an unknown peer is an error, not a silent drop
            await router.send_multipart([b"nobody", *encode(WorkGrant(backoff_s=1.0))], flags=zmq.DONTWAIT)
    finally:
        ctx.destroy(linger=0)


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.mlp.experts.0.up_proj.weight": torch.randn(24, 16, generator=g).to(torch.bfloat16)
            for i in range(6)} | {"model.norm.weight": torch.randn(16, generator=g)}


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
async def test_weights_end_to_end_with_late_joiner_bad_and_old_chunks(transport, tcp_addr, ipc_addr):
    addr = tcp_addr if transport == "tcp" else ipc_addr
    ctx = zmq.asyncio.Context()
    pub = weights_pub(ctx, addr, OPTS)
    publisher = WeightPublisher(pub, WeightSender(chunk_bytes=2000, fp8_block=8))
    state = _state(0)
    try:
        async with _task(publisher.run_subscriptions()):
            # Version 1 goes out before the sampler exists: nobody receives it.
            assert await publisher.publish(1, lambda: state.items()) > 1
            sub = weights_sub(ctx, addr, "s0", OPTS)
            receiver, stats, complete = WeightReceiver(), ChannelStats(), []

            def handle(msg, topic):
                out = receiver.feed(msg)
                if out is not None:
                    complete.append((topic, out))

            async with _task(receive_loop(sub, handle, envelope="topic", stats=stats)):
                # Late join: the WeightsRequest (normally via the DEALER) is served once the SUB is attached.
                publisher.on_request(WeightsRequest(sampler_id="s0", have_version=-1))
                await _until(lambda: publisher.subscribed)
                assert await publisher.serve_pending() == 1
                await _until(lambda: len(complete) == 1)
                # Version 2 starts (after a corrupted copy of its chunk 0), version 3 overtakes it, and a
                # version-2 chunk then arrives interleaved with version 3: refused; version 3 completes.
                for p in state.values():
                    p.mul_(-1)
                v2_chunks = list(publisher.sender.publish(2, lambda: state.items()))
                for p in state.values():
                    p.add_(0.5)
                v3_chunks = list(publisher.sender.publish(3, lambda: state.items()))
                bad = bytearray(b"".join(v2_chunks[0].blob))
                bad[len(bad) // 2] ^= 1
                corrupted = WeightUpdate(**{**v2_chunks[0].__dict__, "blob": bad})
                for m in [corrupted, v2_chunks[0], v3_chunks[0], v2_chunks[1], *v3_chunks[1:]]:
                    await send_message(pub, m, topic=BROADCAST_TOPIC)
                await _until(lambda: len(complete) == 2)  # in-order delivery: everything before is handled
        (t1, v1), (t3, v3) = complete
        assert (v1.version, t1) == (1, b"w:@s0\x00") and (v3.version, t3) == (3, BROADCAST_TOPIC)
        assert stats.errors == 2 and receiver.version == 3 and receiver.abandoned == 1
        assert "interleaved with newer version 3" in stats.last_error
        from minirl_async.models.fp8 import quantize_block_fp8

        for name, w in state.items():
            if name.endswith("_proj.weight"):
                q, s = quantize_block_fp8(w, 8)
                assert torch.equal(v3.tensors[name].view(torch.uint8), q.view(torch.uint8))
                assert torch.equal(v3.tensors[name + "_scale_inv"], s)
            else:
                assert torch.equal(v3.tensors[name], w)
    finally:
        ctx.destroy(linger=0)


# ---------------------------------------------------------------- CurveZMQ
def _keys(tmp_path, name):
    assert keys_main(argparse.Namespace(out_dir=str(tmp_path / name), name=name)) == 0
    return tmp_path / name / f"{name}.key", tmp_path / name / f"{name}.key_secret"


def test_keys_command_refuses_to_overwrite(tmp_path, capsys):
    _keys(tmp_path, "server")
    assert keys_main(argparse.Namespace(out_dir=str(tmp_path / "server"), name="server")) == 2
    assert "exists" in capsys.readouterr().err


def test_unauthenticated_clients_cannot_talk_to_a_curve_socket(tmp_path, tcp_addr):
    server_pub, server_sec = _keys(tmp_path, "server")
    _, good_sec = _keys(tmp_path, "good")
    _, evil_sec = _keys(tmp_path, "evil")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "good.key").write_bytes((tmp_path / "good" / "good.key").read_bytes())

    ctx = zmq.Context()
    auth = start_authenticator(ctx, str(allowed))
    try:
        server = scored_pull(ctx, tcp_addr, SocketOptions(linger_ms=0, curve=CurveConfig(
            server_secret_file=str(server_sec), allowed_clients_dir=str(allowed))))

        def client(curve: CurveConfig):
            push = scored_push(ctx, tcp_addr, SocketOptions(linger_ms=0, curve=curve))
            push.send_multipart(encode(Heartbeat(sender="c", role="grader", seq=0, time_s=0.0)), flags=zmq.DONTWAIT) \
                if push.poll(500, zmq.POLLOUT) else None
            return push

        plain = client(CurveConfig())
        evil = client(CurveConfig(client_secret_file=str(evil_sec), server_public_file=str(server_pub)))
        assert server.poll(700) == 0  # neither the plaintext client nor the unlisted key got through
        good = client(CurveConfig(client_secret_file=str(good_sec), server_public_file=str(server_pub)))
        assert server.poll(5000) != 0
        assert server.recv_multipart()[0]  # the authorised client's message
        assert server.poll(300) == 0
        for s in (plain, evil, good, server):
            s.close(0)
    finally:
        auth.stop()
        ctx.destroy(linger=0)


def test_missing_key_file_is_a_clear_error(tmp_path, tcp_addr):
    ctx = zmq.Context()
    try:
        with pytest.raises(ValueError, match="minirl-async keys"):
            scored_pull(ctx, tcp_addr, SocketOptions(curve=CurveConfig(server_secret_file=str(tmp_path / "no.key_secret"))))
    finally:
        ctx.destroy(linger=0)


def test_frames_over_maxmsgsize_never_arrive(ipc_addr):
    ctx = zmq.Context()
    opts = SocketOptions(linger_ms=0, max_msg_bytes=4096)
    try:
        pull, push = scored_pull(ctx, ipc_addr, opts), scored_push(ctx, ipc_addr, opts)
        push.send(b"z" * 10_000)
        assert pull.poll(500) == 0  # zmq drops the connection instead of delivering it
    finally:
        ctx.destroy(linger=0)


def test_allowed_clients_without_an_authenticator_is_refused(tmp_path, tcp_addr):
    _, server_sec = _keys(tmp_path, "server")
    ctx = zmq.Context()
    try:
        with pytest.raises(ValueError, match="call start_authenticator"):
            scored_pull(ctx, tcp_addr, SocketOptions(curve=CurveConfig(server_secret_file=str(server_sec),
                                                                      allowed_clients_dir=str(tmp_path))))
    finally:
        ctx.destroy(linger=0)


async def test_publisher_serves_requests_only_when_subscribed_behind_and_idle():
    from minirl_async.proto.sockets import personal_topic

    sent = []

    class FakeSock:
        async def send_multipart(self, frames, copy=False, track=False):
            sent.append(frames[0])

    state = _state(3)
    pub = WeightPublisher(FakeSock(), WeightSender(chunk_bytes=2000, keep_blobs=True))
    n = await pub.publish(1, lambda: state.items())
    assert sent == [BROADCAST_TOPIC] * n
    pub.on_request(WeightsRequest(sampler_id="a", have_version=-1))
    assert await pub.serve_pending() == 0 and "a" in pub.pending  # its SUB is not attached yet
    pub.on_subscription(b"\x01" + personal_topic("a"))
    pub.sender.publishing = True
    assert await pub.serve_pending() == 0 and "a" in pub.pending  # mid-publish: wait
    pub.sender.publishing = False
    assert await pub.serve_pending() == 1 and sent[n:] == [personal_topic("a")] * n and not pub.pending
    pub.on_request(WeightsRequest(sampler_id="a", have_version=1))
    assert await pub.serve_pending() == 0 and not pub.pending  # already up to date: dropped
    pub.on_subscription(b"\x00" + personal_topic("a"))
    assert not pub.subscribed


async def _receive_version(sub):
    """Read chunks from `sub` until one version is complete; that version's WeightSet."""
    receiver = WeightReceiver()
    while True:
        frames = await asyncio.wait_for(sub.recv_multipart(copy=False), 10)
        out = receiver.feed(decode(frames[1:]))
        if out is not None:
            return out


async def test_publish_waits_for_a_slow_subscriber_instead_of_failing(tcp_addr):
    # More chunks than the weights high-water mark while the subscriber does not read: the publish waits
    # (an asyncio XPUB with NODROP reports a full pipe as zmq.Again) and every chunk arrives, in order.
    ctx = zmq.asyncio.Context()
    opts = SocketOptions(linger_ms=0, heartbeat_s=0.5, weights_hwm=2)
    try:
        publisher = WeightPublisher(weights_pub(ctx, tcp_addr, opts), WeightSender(chunk_bytes=64 << 10))
        sub = weights_sub(ctx, tcp_addr, "slow", opts)
        sub.setsockopt(zmq.RCVBUF, 1 << 16)
        async with _task(publisher.run_subscriptions()):
            await _until(lambda: publisher.subscribed)
            state = {f"w{i}": torch.randn(256, 256) for i in range(24)}   # 6 MB in 96 chunks of 64 kB
            task = asyncio.create_task(publisher.publish(1, lambda: state.items()))
            await asyncio.sleep(0.5)
            assert not task.done() and publisher.full_waits > 0   # blocked at the mark, not failed
            got = await _receive_version(sub)
            assert await asyncio.wait_for(task, 10) == 96
        assert all(torch.equal(got.tensors[k], v) for k, v in state.items())
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("keep_blobs", [False, True])
async def test_hold_waits_until_zmq_lets_go_of_frames_viewing_the_live_weights(tcp_addr, keep_blobs):
    # Without kept blobs, large live tensors go out as zero-copy frames: a step must not change them while a
    # slow subscriber's pipe still holds them. hold_weights() waits for zmq to release every frame; with kept
    # blobs the chunks own their memory and nothing is waited for.
    ctx = zmq.asyncio.Context()
    opts = SocketOptions(linger_ms=0, heartbeat_s=0.5, weights_hwm=16)
    try:
        publisher = WeightPublisher(weights_pub(ctx, tcp_addr, opts),
                                    WeightSender(chunk_bytes=2 << 20, keep_blobs=keep_blobs))
        sub = weights_sub(ctx, tcp_addr, "slow", SocketOptions(linger_ms=0, heartbeat_s=0.5, weights_hwm=1))
        sub.setsockopt(zmq.RCVBUF, 1 << 16)
        async with _task(publisher.run_subscriptions()):
            await _until(lambda: publisher.subscribed)
            # 2 MiB tensors, one frame each: more than the subscriber's queue and the kernel's buffers hold,
            # fewer than the publisher's high-water mark (so publish() returns with chunks still queued)
            state = {f"w{i}": torch.randn(512, 1024) for i in range(12)}
            expected = {k: v.clone() for k, v in state.items()}
            assert await asyncio.wait_for(publisher.publish(1, lambda: state.items()), 10) == 12
            hold = asyncio.create_task(publisher.hold_weights())
            await asyncio.sleep(0.3)
            assert hold.done() == keep_blobs       # the subscriber has read nothing yet
            got = await _receive_version(sub)
            await asyncio.wait_for(hold, 10)
            for v in state.values():            # the step may now change the weights
                v.zero_()
        assert all(torch.equal(got.tensors[k], v) for k, v in expected.items())
    finally:
        ctx.destroy(linger=0)


async def test_hold_waits_for_every_live_frame_not_only_the_last_of_a_chunk(tcp_addr):
    # Each chunk is header | 2 MiB live tensor (zero copy) | 32-byte tensor (copied: under zmq's copy
    # threshold). pyzmq's send_multipart(track=True) tracks only that last, copied frame, done at once: the
    # step below then changed weights still queued for the slow subscriber (checksum mismatch on arrival).
    ctx = zmq.asyncio.Context()
    opts = SocketOptions(linger_ms=0, heartbeat_s=0.5, weights_hwm=16)
    try:
        publisher = WeightPublisher(weights_pub(ctx, tcp_addr, opts), WeightSender(chunk_bytes=(2 << 20) + 4096))
        sub = weights_sub(ctx, tcp_addr, "slow", SocketOptions(linger_ms=0, heartbeat_s=0.5, weights_hwm=1))
        sub.setsockopt(zmq.RCVBUF, 1 << 16)
        async with _task(publisher.run_subscriptions()):
            await _until(lambda: publisher.subscribed)
            state = {}
            for i in range(8):
                state[f"w{i}"] = torch.randn(512, 1024)
                state[f"n{i}"] = torch.ones(16, dtype=torch.float16)
            expected = {k: v.clone() for k, v in state.items()}
            assert await asyncio.wait_for(publisher.publish(1, lambda: state.items()), 10) == 8
            assert publisher.sender.views_live

            async def step():
                await publisher.hold_weights()
                for v in state.values():
                    v.add_(1)

            stepped = asyncio.create_task(step())
            await asyncio.sleep(0.3)
            assert not stepped.done()          # the subscriber has read nothing yet
            got = await _receive_version(sub)  # a changed chunk would fail its checksum here
            await asyncio.wait_for(stepped, 10)
        assert all(torch.equal(got.tensors[k], v) for k, v in expected.items())
    finally:
        ctx.destroy(linger=0)


async def test_a_subscriber_that_reads_late_still_gets_every_chunk(tcp_addr, ipc_addr):
    # A busy sampler stops reading and its queue fills; with ZMTP heartbeats on the weights channel, the
    # unanswered PINGs dropped the connection and the chunks queued on it (the version never completed).
    ctx = zmq.asyncio.Context()
    opts = SocketOptions(linger_ms=0, heartbeat_s=0.1, weights_hwm=16)
    try:
        pub = weights_pub(ctx, tcp_addr, opts)
        publisher = WeightPublisher(pub, WeightSender(chunk_bytes=1 << 20))
        sub = weights_sub(ctx, tcp_addr, "late", SocketOptions(linger_ms=0, heartbeat_s=0.1, weights_hwm=1))
        sub.setsockopt(zmq.RCVBUF, 1 << 16)
        assert pub.getsockopt(zmq.HEARTBEAT_IVL) == sub.getsockopt(zmq.HEARTBEAT_IVL) == 0
        assert scored_pull(ctx, ipc_addr, opts).getsockopt(zmq.HEARTBEAT_IVL) == 100  # other sockets keep them
        async with _task(publisher.run_subscriptions()):
            await _until(lambda: publisher.subscribed)
            state = {f"w{i}": torch.randn(256, 1024) for i in range(12)}
            assert await asyncio.wait_for(publisher.publish(1, lambda: state.items()), 10) == 12
            await asyncio.sleep(1.5)   # 15 heartbeat intervals
            got = await _receive_version(sub)
        assert all(torch.equal(got.tensors[k], v) for k, v in state.items())
    finally:
        ctx.destroy(linger=0)


async def test_concurrent_serving_serves_each_request_once_and_waits_out_a_hold():
    from minirl_async.proto.sockets import personal_topic

    sent: list[bytes] = []

    class SlowSock:
        async def send_multipart(self, frames, copy=False, track=False):
            await asyncio.sleep(0.01)   # lets the other caller run mid-stream
            sent.append(frames[0])

    state = _state(4)
    pub = WeightPublisher(SlowSock(), WeightSender(chunk_bytes=2000))   # re-serialises: honours `hold`
    n = await pub.publish(1, lambda: state.items())
    for sid in ("a", "b"):
        pub.on_request(WeightsRequest(sampler_id=sid, have_version=-1))
        pub.on_subscription(b"\x01" + personal_topic(sid))
    pub.hold = True   # a step is changing the weights: nothing may be re-serialised now
    assert await pub.serve_pending() == 0 and set(pub.pending) == {"a", "b"}
    pub.hold = False
    served = await asyncio.gather(pub.serve_pending(), pub.serve_pending(), pub.serve_pending())
    assert sum(served) == 2 and not pub.pending
    streams = sent[n:]
    assert sorted(streams) == sorted([personal_topic("a")] * n + [personal_topic("b")] * n)
    assert streams[:n] in ([personal_topic("a")] * n, [personal_topic("b")] * n)   # never interleaved


async def test_hold_waits_for_a_stream_in_progress_and_busy_callers_do_not_queue():
    from minirl_async.proto.sockets import personal_topic

    sent: list[bytes] = []

    class SlowSock:
        async def send_multipart(self, frames, copy=False, track=False):
            await asyncio.sleep(0.01)
            sent.append(frames[0])

    state = _state(5)
    pub = WeightPublisher(SlowSock(), WeightSender(chunk_bytes=2000))
    n = await pub.publish(1, lambda: state.items())
    pub.on_request(WeightsRequest(sampler_id="a", have_version=-1))
    pub.on_subscription(b"\x01" + personal_topic("a"))
    stream = asyncio.create_task(pub.serve_pending())
    await asyncio.sleep(0.015)                      # the resend is going out
    assert await pub.serve_pending() == 0           # a second caller returns at once instead of waiting
    await pub.hold_weights()                        # a step may change the weights only after the stream
    assert stream.done() and await stream == 1 and pub.hold and len(sent) == 2 * n
