"""Wire protocol (imports as `minirl_async.proto`): messages, codec, weight streaming, socket helpers.

    messages.py  message dataclasses (WorkRequest ... Shutdown), their invariants, ProtocolError, PROTO_VERSION
    codec.py     encode(msg) -> frames / decode(frames) -> msg: msgpack header + zero-copy array frames, strict
    stblob.py    safetensors chunk blobs written/read without extra copies, checksums, a buffer pool
    weights.py   WeightSender (plan, bucket, FP8-quantise, resend) and WeightReceiver (verify, assemble)
    sockets.py   one factory per socket of the design, send_message, receive_loop, WeightPublisher, CURVE
    keys.py      `minirl-async keys OUT_DIR [--name NAME]`

Modules are imported explicitly (nothing is re-exported here) so a grader that only decodes messages does
not import torch.
"""
