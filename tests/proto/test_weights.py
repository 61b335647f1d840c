"""Weight streaming in process: chunk planning, exact reassembly (bf16, fp32, FP8 + scales), safetensors
compatibility both ways, resend for late joiners, and the receiver's refusal rules."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from minirl_async.proto.messages import ProtocolError
from minirl_async.proto.stblob import MAX_CHUNK_TENSORS, read_blob, write_blob
from minirl_async.proto.weights import TensorSpec, WeightReceiver, WeightSender

from minirl_async.models.fp8 import dequantize_block_fp8, quantize_block_fp8


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = {"model.embed_tokens.weight": torch.randn(40, 16, generator=g).to(torch.bfloat16)}
    for i in range(2):
        p = f"model.layers.{i}."
        s[p + "self_attn.q_proj.weight"] = torch.randn(32, 16, generator=g).to(torch.bfloat16)
        s[p + "mlp.gate.weight"] = torch.randn(4, 16, generator=g).to(torch.bfloat16)  # router: never FP8
        s[p + "mlp.experts.0.down_proj.weight"] = torch.randn(16, 20, generator=g).to(torch.bfloat16)
        s[p + "input_layernorm.weight"] = torch.rand(16, generator=g)  # float32
    s["step"] = torch.tensor([7], dtype=torch.int64)
    return s


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _run(msgs, receiver=None):
    receiver = receiver or WeightReceiver()
    outs = [receiver.feed(m) for m in msgs]
    assert all(o is None for o in outs[:-1])
    return outs[-1]


@pytest.mark.parametrize("algo", ["crc32", "xxh3_64"])
def test_plain_state_round_trips_bit_exactly(algo):
    state = _state()
    sender = WeightSender(chunk_bytes=1500, checksum_algo=algo)
    msgs = list(sender.publish(5, lambda: state.items()))
    n = len(msgs)
    assert n > 2 and [m.chunk_index for m in msgs] == list(range(n))
    assert all(m.num_chunks == n and m.version == 5 and m.num_tensors == len(state) for m in msgs)
    out = _run(msgs, WeightReceiver(expected_names=state))
    assert out.version == 5 and not out.fp8 and set(out.tensors) == set(state)
    assert all(_identical(out.tensors[k], v) for k, v in state.items())


def test_buckets_respect_chunk_size_and_split_larger_tensors():
    specs = [TensorSpec(f"t{i}", (100,), torch.float32) for i in range(5)] + [TensorSpec("big", (1000,), torch.float32)]
    plan = WeightSender(chunk_bytes=1000).plan(0, specs)
    sizes = [sum(p.nbytes for p in b) for b in plan.buckets]
    assert sizes == [800, 800, 400, 1000, 1000, 1000, 1000]  # 400-byte tensors two per chunk; big in 4 row pieces
    assert plan.num_tensors == 6 and [p.rows for p in plan.buckets[-1]] == [(750, 1000)]


def test_chunks_hold_at_most_max_chunk_tensors_so_their_headers_stay_readable():
    state = {f"model.layers.{i}.norm.bias": torch.full((1,), float(i)) for i in range(MAX_CHUNK_TENSORS + 10)}
    msgs = list(WeightSender(chunk_bytes=64 << 20).publish(1, lambda: state.items()))
    assert len(msgs) == 2
    out = _run(msgs)
    assert all(torch.equal(out.tensors[k], v) for k, v in state.items())


def test_tensors_larger_than_a_chunk_travel_in_row_pieces():
    g = torch.Generator().manual_seed(9)
    state = {"model.embed_tokens.weight": torch.randn(103, 16, generator=g).to(torch.bfloat16),  # 3296 bytes
             "model.layers.0.self_attn.o_proj.weight": torch.randn(70, 40, generator=g).to(torch.bfloat16),
             "model.norm.weight": torch.randn(16, generator=g)}
    sender = WeightSender(chunk_bytes=700, fp8_block=16)
    msgs = list(sender.publish(1, lambda: state.items()))
    assert all(sum(map(len, m.blob)) < 700 + 600 for m in msgs)  # payload <= chunk_bytes, plus the JSON header
    assert msgs[0].num_tensors == 4
    out = _run(msgs[::-1], WeightReceiver())
    assert _identical(out.tensors["model.embed_tokens.weight"], state["model.embed_tokens.weight"])
    q, sc = quantize_block_fp8(state["model.layers.0.self_attn.o_proj.weight"], 16)
    assert _identical(out.tensors["model.layers.0.self_attn.o_proj.weight"], q)
    assert _identical(out.tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"], sc)
    assert set(out.tensors) == {*state, "model.layers.0.self_attn.o_proj.weight_scale_inv"}
    assert list(sender.resend())[-1].checksum == msgs[-1].checksum


def _split_chunk(pieces, splits):
    import json

    from minirl_async.proto.messages import WeightUpdate
    from minirl_async.proto.stblob import checksum
    from minirl_async.proto.weights import SPLIT_KEY, chunk_metadata

    blob = write_blob(pieces, {**chunk_metadata(1, 5, 0, 1, 1, 0), SPLIT_KEY: json.dumps(splits)})
    return WeightUpdate(version=1, publish_id=5, chunk_index=0, num_chunks=1, num_tensors=1, blob=blob,
                        checksum=checksum(blob, "crc32"), checksum_algo="crc32")


def test_row_pieces_with_a_gap_are_refused():
    msg = _split_chunk([("w[0:2]", torch.ones(2, 3)), ("w[3:5]", torch.ones(2, 3))],
                       {"w[0:2]": ["w", 0, 2, 5], "w[3:5]": ["w", 3, 5, 5]})
    with pytest.raises(ProtocolError, match="row pieces of w overlap, leave a gap"):
        WeightReceiver().feed(msg)


def test_row_piece_metadata_must_match_the_tensor():
    msg = _split_chunk([("w[0:2]", torch.ones(3, 3))], {"w[0:2]": ["w", 0, 2, 3]})
    with pytest.raises(ProtocolError, match="has 3 rows for range"):
        WeightReceiver().feed(msg)


def test_order_of_arrival_does_not_matter():
    state = _state(1)
    msgs = list(WeightSender(chunk_bytes=1000).publish(1, lambda: state.items()))
    out = _run(msgs[::-1])
    assert all(_identical(out.tensors[k], v) for k, v in state.items())


def test_sender_streams_bucket_by_bucket():
    """Chunk 0 is out before the state iterator is asked for the tensors of chunk 1 (no full second copy)."""
    state = _state()
    consumed: list[str] = []

    def state_fn():
        for k, v in state.items():
            consumed.append(k)
            yield k, v

    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    gen = WeightSender(chunk_bytes=1500).publish(1, state_fn, specs)
    first = next(gen)
    assert 0 < len(consumed) < len(state)
    assert len(read_blob(first.blob)[0]) == len(consumed)


def test_fp8_chunks_match_direct_quantisation():
    state = _state(2)
    msgs = list(WeightSender(chunk_bytes=2000, fp8_block=8).publish(3, lambda: state.items()))
    out = _run(msgs)
    assert out.fp8 and out.fp8_block == 8
    for name, w in state.items():
        if name.endswith("_proj.weight"):
            q, s = quantize_block_fp8(w, 8)
            assert _identical(out.tensors[name], q) and _identical(out.tensors[name + "_scale_inv"], s)
            # and the dequantised weight is within the block-FP8 error bound of the original (fp64 check)
            deq = dequantize_block_fp8(out.tensors[name], out.tensors[name + "_scale_inv"], 8, torch.float64)
            w64 = w.double()
            bound = torch.maximum(2**-4 * w64.abs(), 2**-10 * s.double().repeat_interleave(8, 0)
                                  .repeat_interleave(8, 1)[: w.shape[0], : w.shape[1]]) + 1e-6 * w64.abs()
            assert ((deq - w64).abs() <= bound).all()
        else:
            assert _identical(out.tensors[name], w) and name + "_scale_inv" not in out.tensors
    assert msgs[0].num_tensors == len(state) + 4


def test_dtype_cast_for_non_quantised_floats():
    state = {"a.weight": torch.randn(4, 4, dtype=torch.float32), "ids": torch.arange(3)}
    out = _run(list(WeightSender(chunk_bytes=1 << 20, dtype=torch.bfloat16).publish(0, lambda: state.items())))
    assert _identical(out.tensors["a.weight"], state["a.weight"].to(torch.bfloat16))
    assert _identical(out.tensors["ids"], state["ids"])


def test_blobs_are_standard_safetensors_both_ways():
    tensors = [("x", torch.randn(3, 5).to(torch.bfloat16)), ("y", torch.randn(7)),
               ("z", torch.randn(4, 4).to(torch.float8_e4m3fn)), ("empty", torch.zeros(0, 2))]
    ours = safetensors.torch.load(bytes(write_blob(tensors, {"version": "1"})))
    theirs, meta = read_blob(safetensors.torch.save(dict(tensors), {"version": "1"}))
    assert meta == {"version": "1"}
    for name, t in tensors:
        assert _identical(ours[name], t) and _identical(theirs[name], t)


def test_resend_reserialises_the_same_chunks():
    state = _state(3)
    sender = WeightSender(chunk_bytes=1500)
    first = list(sender.publish(4, lambda: state.items()))
    again = list(sender.resend())
    assert sender.last_version == 4 and [m.checksum for m in again] == [m.checksum for m in first]
    out = _run(again)
    assert all(_identical(out.tensors[k], v) for k, v in state.items())


def test_resend_refuses_a_state_that_moved_on():
    state = _state(4)
    sender = WeightSender(chunk_bytes=1500)
    list(sender.publish(1, lambda: state.items()))
    state["model.layers.1.input_layernorm.weight"].add_(1.0)  # an optimizer step happened
    with pytest.raises(RuntimeError, match="weights changed since version 1"):
        list(sender.resend())


def test_resend_from_kept_blobs_survives_updates():
    state = _state(5)
    original = {k: v.clone() for k, v in state.items()}
    sender = WeightSender(chunk_bytes=1500, keep_blobs=True)
    list(sender.publish(1, lambda: state.items()))
    for v in state.values():
        v.zero_()
    out = _run(list(sender.resend()))
    assert out.version == 1 and all(_identical(out.tensors[k], v) for k, v in original.items())


def test_nondeterministic_state_is_refused():
    state = _state()
    calls = {"n": 0}

    def state_fn():
        calls["n"] += 1
        items = list(state.items())
        return items if calls["n"] == 1 else items[::-1]

    with pytest.raises(ValueError, match="state_fn must be deterministic"):
        list(WeightSender(chunk_bytes=1500).publish(1, state_fn))


def test_receiver_refuses_applied_versions_duplicates_and_wrong_sets():
    state = _state(6)
    msgs = list(WeightSender(chunk_bytes=1500).publish(2, lambda: state.items()))
    recv = WeightReceiver()
    recv.feed(msgs[0])
    with pytest.raises(ProtocolError, match="duplicate chunk"):
        recv.feed(msgs[0])
    for m in msgs[1:]:
        recv.feed(m)
    assert recv.version == 2 and recv.pending_version is None
    with pytest.raises(ProtocolError, match="version 2 is already applied"):
        recv.feed(msgs[1])
    strict = WeightReceiver(expected_names=[*state, "model.extra.weight"])
    with pytest.raises(ProtocolError, match=r"missing \['model.extra.weight'\]"):
        _run(msgs, strict)
    assert strict.version == -1


def test_sender_refuses_old_versions_and_empty_states():
    sender = WeightSender(chunk_bytes=100)
    list(sender.publish(3, lambda: {"a": torch.ones(2)}.items()))
    with pytest.raises(ValueError, match="not newer"):
        list(sender.publish(3, lambda: {"a": torch.ones(2)}.items()))
    with pytest.raises(ValueError, match="empty state"):
        list(WeightSender(chunk_bytes=100).publish(0, lambda: iter(())))


def test_blob_pool_reuses_only_unreferenced_buffers():
    from minirl_async.proto.stblob import BlobPool

    pool = BlobPool(max_buffers=4)
    a = pool.alloc(1000)
    b = pool.alloc(1000)
    assert a.obj is not b.obj  # `a` is still referenced: not handed out twice
    a_obj = a.obj
    del a
    c = pool.alloc(900)
    assert c.obj is not a_obj  # `a_obj` (our own reference) still holds it
    del a_obj, c
    d = pool.alloc(1000)
    assert d.obj is pool._bufs[0] and d.nbytes == 1000


def test_a_publish_in_progress_keeps_the_previous_version_for_resend():
    state = _state(7)
    sender = WeightSender(chunk_bytes=1500, keep_blobs=True)
    first = list(sender.publish(1, lambda: state.items()))
    gen = sender.publish(2, lambda: state.items())
    next(gen)
    assert sender.publishing and sender.last_version == 1
    assert [m.checksum for m in sender.resend()] == [m.checksum for m in first]
    list(gen)
    assert not sender.publishing and sender.last_version == 2


# ---------------------------------------------------------------- publish ids
def test_a_version_is_never_assembled_from_two_publishes():
    """The learner dies after chunks 0-1 of version 3 (publish A), restarts from its version-2 checkpoint and
    publishes a different version 3 (publish B): the sampler must end up with exactly B's weights."""
    state_a, state_b = _state(10), _state(11)
    a = list(WeightSender(chunk_bytes=1500).publish(3, lambda: state_a.items()))
    b = list(WeightSender(chunk_bytes=1500).publish(3, lambda: state_b.items()))  # the restarted learner
    assert len(a) == len(b) > 3 and a[0].publish_id != b[0].publish_id
    recv = WeightReceiver()
    assert recv.feed(a[0]) is None and recv.feed(a[1]) is None
    out = _run(b, recv)
    assert out.version == 3 and recv.abandoned == 1 and recv.pending_version is None
    assert set(out.tensors) == set(state_b) and all(_identical(out.tensors[k], v) for k, v in state_b.items())


def test_chunks_of_two_publishes_interleaved_end_with_the_last_publish_complete():
    """A chunk of another publish starts the version over; a full (re)send of one publish then completes it."""
    state_a, state_b = _state(12), _state(13)
    sender_b = WeightSender(chunk_bytes=1500)
    a = list(WeightSender(chunk_bytes=1500).publish(3, lambda: state_a.items()))
    b = list(sender_b.publish(3, lambda: state_b.items()))
    recv = WeightReceiver()
    for m in (a[0], b[0], a[1]):  # A, then B, then a late chunk of A again
        assert recv.feed(m) is None
    assert recv.abandoned == 2 and recv.pending_publish_id == a[0].publish_id
    out = _run(list(sender_b.resend()), recv)
    assert recv.abandoned == 3 and all(_identical(out.tensors[k], v) for k, v in state_b.items())


@pytest.mark.parametrize("keep_blobs", [False, True])
def test_every_chunk_and_resend_of_a_publish_carries_its_id(keep_blobs):
    import random

    state = _state(14)
    ids = []
    for _ in range(2):  # a restarted learner restores its RNG states: the id must not come from them
        random.seed(0)
        torch.manual_seed(0)
        sender = WeightSender(chunk_bytes=1500, keep_blobs=keep_blobs)
        first = list(sender.publish(1, lambda: state.items()))
        again = list(sender.resend())
        assert len({m.publish_id for m in first + again}) == 1
        assert [m.checksum for m in again] == [m.checksum for m in first]
        nxt = list(sender.publish(2, lambda: state.items()))
        assert {m.publish_id for m in nxt} != {first[0].publish_id}
        assert {m.publish_id for m in sender.resend()} == {nxt[0].publish_id}
        ids.append(first[0].publish_id)
    assert ids[0] != ids[1]


def test_blob_metadata_repeats_the_header():
    from minirl_async.proto.weights import chunk_metadata

    state = _state(15)
    for m in WeightSender(chunk_bytes=1500, fp8_block=8).publish(2, lambda: state.items()):
        meta = read_blob(m.blob)[1]
        assert {k: meta[k] for k in chunk_metadata(0, 0, 0, 1, 1, 0)} == chunk_metadata(
            m.version, m.publish_id, m.chunk_index, m.num_chunks, m.num_tensors, m.fp8_block)
        assert safetensors.torch.load(b"".join(m.blob))  # still a standard safetensors file


def test_unknown_blob_metadata_is_refused():
    import json

    from minirl_async.proto.messages import WeightUpdate
    from minirl_async.proto.stblob import checksum
    from minirl_async.proto.weights import chunk_metadata

    blob = write_blob([("w", torch.ones(2))], {**chunk_metadata(1, 5, 0, 1, 1, 0), "note": json.dumps(1)})
    msg = WeightUpdate(version=1, publish_id=5, chunk_index=0, num_chunks=1, num_tensors=1, blob=blob,
                       checksum=checksum(blob, "crc32"), checksum_algo="crc32")
    recv = WeightReceiver()
    with pytest.raises(ProtocolError, match=r"unexpected blob metadata key\(s\) \['note'\]"):
        recv.feed(msg)
    assert recv.pending_version is None


# ---------------------------------------------------------------- segments: zero-copy chunks
def _big_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return {"a.weight": torch.randn(1024, 640, generator=g),                       # 2.5 MiB fp32: lent
            "b.weight": torch.randn(700, 1024, generator=g).to(torch.bfloat16),    # 1.4 MiB bf16: lent
            "norm.weight": torch.rand(640, generator=g)}                           # small: copied


@pytest.mark.parametrize("algo", ["crc32", "xxh3_64"])
def test_segments_view_large_tensors_and_form_the_same_file(algo):
    from minirl_async.proto.stblob import checksum, write_segments

    items = list(_big_state().items())
    segs = write_segments(items, {"k": "v"}, borrow=lambda i: True)
    whole = write_blob(items, {"k": "v"})
    joined = b"".join(segs)
    assert len(segs) == 4 and joined == bytes(whole)            # header | a | norm | b: byte for byte the file
    assert checksum(segs, algo) == checksum(whole, algo)
    ptrs = {torch.frombuffer(s, dtype=torch.uint8).data_ptr() for s in segs}
    assert {t.data_ptr() for n, t in items if n != "norm.weight"} <= ptrs   # no copy of the large ones
    tensors, meta = read_blob(segs)
    assert meta == {"k": "v"} and all(_identical(tensors[n], t) for n, t in items)
    assert all(_identical(safetensors.torch.load(joined)[n], t) for n, t in items)
    assert len(write_segments(items, None, borrow=lambda i: False)) == 1     # nothing lent: one buffer


def test_segments_that_split_a_tensor_or_the_header_are_refused():
    whole = bytes(write_blob(list(_big_state().items())))
    hlen = int.from_bytes(whole[:8], "little")
    with pytest.raises(ProtocolError, match="straddle"):
        read_blob([whole[:8 + hlen + 1000], whole[8 + hlen + 1000:]])
    with pytest.raises(ProtocolError, match="first segment"):
        read_blob([whole[:20], whole[20:]])
    with pytest.raises(ProtocolError, match="no segments"):
        read_blob([])


@pytest.mark.parametrize("keep_blobs", [False, True])
def test_sender_lends_live_tensors_only_without_kept_blobs(keep_blobs):
    state = _big_state()
    sender = WeightSender(chunk_bytes=4 << 20, keep_blobs=keep_blobs, dtype=torch.bfloat16)
    msgs = list(sender.publish(1, lambda: state.items()))
    ptrs = {torch.frombuffer(s, dtype=torch.uint8).data_ptr() for m in msgs for s in m.blob}
    # b.weight is live bf16 (sent as it is): viewed only when chunks are not kept; a.weight is cast to bf16
    # by the sender (its own fresh tensor): always viewed.
    assert (state["b.weight"].data_ptr() in ptrs) == (not keep_blobs)
    assert sender.views_live == (not keep_blobs)      # the publisher tracks sends of such chunks
    assert len(msgs[0].blob) == (4 if not keep_blobs else 3)      # header | a | b | norm, or header | a | b+norm
    out = _run(msgs)
    assert _identical(out.tensors["b.weight"], state["b.weight"])
    assert _identical(out.tensors["a.weight"], state["a.weight"].to(torch.bfloat16))


def test_chunks_of_cast_or_quantised_tensors_never_view_the_live_state():
    state = {k: v.float() for k, v in _big_state().items()}
    cast = WeightSender(chunk_bytes=4 << 20, dtype=torch.bfloat16)
    msgs = list(cast.publish(1, lambda: state.items()))
    assert not cast.views_live and len(msgs[0].blob) > 1      # zero copy, of the sender's own bf16 copies only
    fp8 = WeightSender(chunk_bytes=4 << 20, fp8_block=32, dtype=torch.bfloat16,
                       fp8_filter=lambda name: name != "norm.weight")
    list(fp8.publish(1, lambda: state.items()))
    assert not fp8.views_live
