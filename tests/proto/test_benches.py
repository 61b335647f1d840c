"""The two transport benches run end to end in quick mode and report their figures (no timing thresholds)."""

from __future__ import annotations

import importlib


def test_codec_bench_quick():
    out = importlib.import_module("minirl_async.bench.codec").run(quick=True)
    assert out["tokens_per_s"] > 0 and out["ratio"] > 0
    # routes dominate: (P+R-1)/R * 48 * 8 bytes per token plus 12 bytes of ids/logprobs/versions
    assert 396 < out["bytes_per_token"] < 440


def test_weightsync_bench_quick():
    out = importlib.import_module("minirl_async.bench.weightsync").run(quick=True)
    assert out["bytes"] == 16 << 20 and out["ratio"] > 0 and out["ratio_of"] in ("tcp", "ipc")
    assert {"memcpy_gbps", "tcp_gbps", "ipc_gbps", "tcp_ratio", "ipc_ratio"} <= out.keys()
    # the reported figures agree with each other: GB/s from bytes and seconds, ratios of those GB/s
    for t in ("tcp", "ipc"):
        assert abs(out[f"{t}_gbps"] - out["bytes"] / 1e9 / out[f"{t}_s"]) < 0.01 * out[f"{t}_gbps"] + 1e-3
        assert abs(out[f"{t}_ratio"] - out[f"{t}_gbps"] / out["memcpy_gbps"]) < 2e-3
    assert out["ratio"] == max(out["tcp_ratio"], out["ipc_ratio"]) == out[f"{out['ratio_of']}_ratio"]
