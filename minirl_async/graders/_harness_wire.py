"""The code grader's in-sandbox harness, part 2 of 5: what crosses between the program's and the judge's
sandboxes, which share nothing but two pipes. `_harness.py` joins the parts into one script (standard library
only, Python >= 3.8 at run time, never imported).

`Channel` frames length-prefixed JSON messages over the pipes. `Codec` sends a value as plain data (None,
bool, int, float, complex, str, bytes, list, tuple, dict, set, ranges, Fraction, Decimal, deque, Counter,
OrderedDict, numpy arrays), decoded by the other side into its own objects, so every comparison the tests
make runs on the judge's types; anything else crosses as a handle and becomes a `Proxy` (part 3) there.
"""

import json
import os
import struct
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # one namespace in the joined script: these imports are for the type checker only
    from minirl_async.graders._harness_proxy import Proxy

_MAX_MESSAGE = 64 << 20


class ChannelClosed(Exception):
    pass


class ProtocolError(Exception):
    pass


class RemoteError(Exception):
    """An exception of the other side with no builtin equivalent (or the other side ended)."""


class Channel:
    """Length-prefixed JSON messages over two pipes."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd

    def send(self, obj: object) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode("ascii")
        if len(data) > _MAX_MESSAGE:
            raise ValueError(f"message of {len(data)} bytes is over the limit ({_MAX_MESSAGE})")
        view = memoryview(struct.pack(">I", len(data)) + data)
        try:
            while view:
                view = view[os.write(self.wfd, view):]
        except OSError as e:
            raise ChannelClosed(str(e)) from None

    def _exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            try:
                b = os.read(self.rfd, min(left, 1 << 20))
            except OSError as e:
                raise ChannelClosed(str(e)) from None
            if not b:
                raise ChannelClosed("end of stream")
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)

    def recv(self) -> dict:
        (n,) = struct.unpack(">I", self._exact(4))
        if n > _MAX_MESSAGE:
            raise ProtocolError(f"message of {n} bytes is over the limit")
        try:
            msg = json.loads(self._exact(n))
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"undecodable message: {type(e).__name__}") from None
        if type(msg) is not dict:
            raise ProtocolError("a message must be an object")
        return msg


def _std(module: str, name: str) -> object:
    m = sys.modules.get(module)
    return getattr(m, name, None) if m is not None else None


class Codec:
    """Values as plain data or handles: `mine` holds this side's objects sent as handles, `theirs` the proxies
    of the other side's handles."""

    def __init__(self) -> None:
        self.mine: dict[int, object] = {}
        self.mine_ids: dict[int, int] = {}
        self.theirs: dict[int, Proxy] = {}

    def handle(self, obj: object) -> int:
        h = self.mine_ids.get(id(obj))
        if h is None or self.mine.get(h) is not obj:
            h = len(self.mine) + 1
            self.mine[h], self.mine_ids[id(obj)] = obj, h
        return h

    def ref(self, obj: object) -> dict:
        return {"t": "ref", "id": self.handle(obj), "type": type(obj).__name__[:100]}

    def enc(self, x: Any, path: frozenset = frozenset(), depth: int = 0) -> Any:
        t = type(x)
        if x is None or t is bool or t is str or t is float:
            return x
        if t is int:
            return x if -(1 << 53) < x < (1 << 53) else {"t": "int", "v": hex(x)}
        if isinstance(x, Proxy):
            if x._peer is self:
                return {"t": "back", "id": x._id}
            raise TypeError("a proxy of another channel cannot be sent")
        if isinstance(x, bool):
            return bool(x)
        if isinstance(x, int):
            return self.enc(int.__int__(x))
        if isinstance(x, float):
            return float.__float__(x)
        if isinstance(x, str):
            return str.__str__(x)
        if isinstance(x, complex):
            return {"t": "complex", "v": [x.real, x.imag]}
        if isinstance(x, (bytes, bytearray)):
            import base64

            return {"t": "bytearray" if isinstance(x, bytearray) else "bytes", "v": base64.b64encode(bytes(x)).decode()}
        if depth > 200 or id(x) in path:  # too deep, or a container holding itself: send it as a handle
            return self.ref(x)
        inner, d = path | {id(x)}, depth + 1
        if isinstance(x, list):
            return [self.enc(e, inner, d) for e in list.__iter__(x)]
        if isinstance(x, tuple):
            return {"t": "tuple", "v": [self.enc(e, inner, d) for e in tuple.__iter__(x)]}
        if isinstance(x, dict):
            kind = "dict"
            if _std("collections", "Counter") in t.__mro__:
                kind = "counter"
            elif _std("collections", "OrderedDict") in t.__mro__:
                kind = "odict"
            return {"t": kind, "v": [[self.enc(k, inner, d), self.enc(v, inner, d)] for k, v in dict.items(x)]}
        if isinstance(x, frozenset):
            return {"t": "frozenset", "v": [self.enc(e, inner, d) for e in frozenset.__iter__(x)]}
        if isinstance(x, set):
            return {"t": "set", "v": [self.enc(e, inner, d) for e in set.__iter__(x)]}
        if t is range:
            return {"t": "range", "v": [self.enc(x.start), self.enc(x.stop), self.enc(x.step)]}
        if t is _std("collections", "deque"):
            return {"t": "deque", "v": [self.enc(e, inner, d) for e in x], "maxlen": x.maxlen}
        if t is _std("fractions", "Fraction"):
            return {"t": "fraction", "v": [self.enc(x.numerator), self.enc(x.denominator)]}
        if t is _std("decimal", "Decimal"):
            return {"t": "decimal", "v": str(x)}
        if getattr(t, "__module__", None) == "numpy" and hasattr(x, "tolist"):
            if hasattr(x, "shape") and hasattr(x, "dtype") and getattr(x, "ndim", 0) > 0:
                return {"t": "ndarray", "v": self.enc(x.tolist(), inner, d), "dtype": str(x.dtype)}
            return self.enc(x.tolist(), inner, d)
        return self.ref(x)

    def dec(self, v: object) -> object:
        t = type(v)
        if v is None or t is bool or t is int or t is float or t is str:
            return v
        if t is list:
            return [self.dec(e) for e in v]  # type: ignore[attr-defined]
        if t is not dict:
            raise ProtocolError(f"cannot decode a {t.__name__}")
        kind, val = v.get("t"), v.get("v")  # type: ignore[attr-defined]
        if kind == "int" and type(val) is str and len(val) < (1 << 20):
            return int(val, 16)
        if kind == "tuple" and type(val) is list:
            return tuple(self.dec(e) for e in val)
        if kind in ("dict", "counter", "odict") and type(val) is list:
            items = [(self.dec(p[0]), self.dec(p[1])) for p in val if type(p) is list and len(p) == 2]
            if len(items) != len(val):
                raise ProtocolError("bad dict")
            if kind == "dict":
                return dict(items)
            import collections

            return collections.Counter(dict(items)) if kind == "counter" else collections.OrderedDict(items)
        if kind in ("set", "frozenset") and type(val) is list:
            return (set if kind == "set" else frozenset)(self.dec(e) for e in val)
        if kind in ("bytes", "bytearray") and type(val) is str:
            import base64

            b = base64.b64decode(val, validate=True)
            return b if kind == "bytes" else bytearray(b)
        if kind == "complex" and type(val) is list and len(val) == 2 and all(type(p) in (int, float) for p in val):
            return complex(val[0], val[1])
        if kind == "range" and type(val) is list and len(val) == 3:
            bounds: list[Any] = [self.dec(p) for p in val]
            if not all(type(p) is int for p in bounds):
                raise ProtocolError("bad range")
            return range(*bounds)
        if kind == "deque" and type(val) is list:
            import collections

            maxlen = v.get("maxlen")  # type: ignore[attr-defined]
            return collections.deque((self.dec(e) for e in val), maxlen if type(maxlen) is int else None)
        if kind == "fraction" and type(val) is list and len(val) == 2:
            import fractions

            num, den = self.dec(val[0]), self.dec(val[1])
            if type(num) is not int or type(den) is not int or den == 0:
                raise ProtocolError("bad fraction")
            return fractions.Fraction(num, den)
        if kind == "decimal" and type(val) is str and len(val) < 10000:
            import decimal

            return decimal.Decimal(val)
        if kind == "ndarray":
            data, dtype = self.dec(val), v.get("dtype")  # type: ignore[attr-defined]
            try:
                import numpy

                ok = type(dtype) is str and dtype.isalnum() and len(dtype) < 20
                return numpy.array(data, dtype=numpy.dtype(dtype) if ok else None)
            except Exception:
                return data
        if kind == "ref" and type(v.get("id")) is int:  # type: ignore[attr-defined]
            h = v["id"]  # type: ignore[index]
            p = self.theirs.get(h)
            if p is None:
                p = self.theirs[h] = Proxy(self, h, str(v.get("type", "?"))[:100])  # type: ignore[arg-type, attr-defined]
            return p
        if kind == "back" and type(v.get("id")) is int and v["id"] in self.mine:  # type: ignore[attr-defined, index]
            return self.mine[v["id"]]  # type: ignore[index]
        raise ProtocolError(f"cannot decode {str(kind)[:40]!r}")
