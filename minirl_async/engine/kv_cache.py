"""Static per-slot KV cache of the embedded engine, plugged into the model's `kv_cache` hook.

Buffers are preallocated once: keys and values `[layers, slots, Hkv, S_max, hd]` in the compute dtype, so
decoding never allocates cache memory. Active sequences always occupy slots `0..n-1` (the engine compacts
by moving the last active slot into a freed one), which lets every read be a plain slice (a view, no
gather). Before each forward the engine `bind`s the rows and the write positions; the model then calls
`update(layer, k, v)` once per layer, which writes the new keys/values at those positions and returns the
first `S` positions of the bound rows. Positions a row has not written yet hold stale data; the engine's
attention mask hides them.

    cache = SlotKVCache(num_layers, max_slots, Hkv, S_max, hd, dtype)
    cache.bind(rows=slice(0, n), pos_B=pos_B, T=1, S=int(pos_B.max()) + 1)
    logits = model(ids_B1, position_ids_BT=pos_B[:, None], kv_cache=cache, attn_mask=mask_B11S)

Legend: B bound rows, H kv heads, T new tokens, S keys returned, d head dim.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, num_layers: int, max_slots: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, max_slots, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self._rows = slice(0, 0)
        self._row_idx_B1 = torch.zeros(0, 1, dtype=torch.long)
        self._pos_BT = torch.zeros(0, 1, dtype=torch.long)
        self._T = 0
        self._S = 0

    def bind(self, rows: slice, pos_B: torch.Tensor, T: int, S: int) -> None:
        """Next forward: rows `rows` (contiguous slots), new tokens at positions `pos_B[i] .. pos_B[i]+T-1`,
        and the model may attend to keys `0..S-1`."""
        assert rows.start is not None and rows.stop is not None
        B = rows.stop - rows.start
        assert pos_B.shape == (B,) and S <= self.max_len
        self._rows, self._T, self._S = rows, T, S
        dev = self.k.device
        if T == 1:
            self._pos_BT = pos_B.to(dev)[:, None]
        else:
            self._pos_BT = pos_B.to(dev)[:, None] + torch.arange(T, device=dev)[None, :]
        self._row_idx_B1 = torch.arange(rows.start, rows.stop, device=dev)[:, None]

    def update(self, layer_idx: int, k_BHTd: torch.Tensor,
               v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_l, v_l = self.k[layer_idx], self.v[layer_idx]
        # Advanced indices on dims 0 and 2 (separated by a slice) put their broadcast shape [B, T] first:
        # the value must be [B, T, H, d].
        k_l[self._row_idx_B1, :, self._pos_BT] = k_BHTd.transpose(1, 2).to(k_l.dtype)
        v_l[self._row_idx_B1, :, self._pos_BT] = v_BHTd.transpose(1, 2).to(v_l.dtype)
        return k_l[self._rows, :, : self._S], v_l[self._rows, :, : self._S]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` (all layers)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
