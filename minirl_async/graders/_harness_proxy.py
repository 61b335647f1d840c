"""The code grader's in-sandbox harness, part 3 of 5: `Proxy`, an object of the other side. `_harness.py`
joins the parts into one script (standard library only, Python >= 3.8 at run time, never imported).

Calls, attributes, items, iteration, len/bool/str/int/float are forwarded, but a proxy is never equal to (or
ordered against, or combined by an operator with) plain data: an object that claims to equal everything
equals nothing. `x in proxy` iterates the proxy and compares in the judge, and a `with` block on a proxy
never swallows an exception, whatever the program's __contains__ / __exit__ say. Two proxies compare with
the program's own operators (a test that compares two program objects asks the program).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # one namespace in the joined script: these imports are for the type checker only
    from minirl_async.graders._harness_peer import Peer


class Proxy:
    """An object of the other side. Comparisons and arithmetic are forwarded only between two proxies."""

    __slots__ = ("_peer", "_id", "_type", "__weakref__")
    _peer: Peer
    _id: int
    _type: str

    def __init__(self, peer: Peer, handle: int, type_name: str):
        object.__setattr__(self, "_peer", peer)
        object.__setattr__(self, "_id", handle)
        object.__setattr__(self, "_type", type_name)

    def _req(self, op: str, *args: object) -> object:
        return self._peer.request(op, self, *args)

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._req("getattr", name)

    def __setattr__(self, name: str, value: object) -> None:
        self._req("setattr", name, value)

    def __delattr__(self, name: str) -> None:
        self._req("delattr", name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self._peer.request("call", self, list(args), kwargs)

    def __getitem__(self, key: object) -> object:
        return self._req("getitem", key)

    def __setitem__(self, key: object, value: object) -> None:
        self._req("setitem", key, value)

    def __delitem__(self, key: object) -> None:
        self._req("delitem", key)

    def __iter__(self) -> object:
        return self._req("iter")

    def __next__(self) -> object:
        return self._req("next")

    def __len__(self) -> int:
        return _typed(self._req("len"), int, "len()")

    def __bool__(self) -> bool:
        return _typed(self._req("bool"), bool, "bool()")

    def __str__(self) -> str:
        return _typed(self._req("str"), str, "str()")

    def __repr__(self) -> str:
        try:
            return _typed(self._req("repr"), str, "repr()")
        except Exception:
            return f"<{self._type} object of the program>"

    def __int__(self) -> int:
        return _typed(self._req("unop", "int"), int, "int()")

    def __index__(self) -> int:
        return _typed(self._req("unop", "index"), int, "index()")

    def __float__(self) -> float:
        return _typed(self._req("unop", "float"), float, "float()")

    def __complex__(self) -> complex:
        return _typed(self._req("unop", "complex"), complex, "complex()")

    def __neg__(self) -> object:
        return self._req("unop", "neg")

    def __pos__(self) -> object:
        return self._req("unop", "pos")

    def __abs__(self) -> object:
        return self._req("unop", "abs")

    def __invert__(self) -> object:
        return self._req("unop", "invert")

    def __enter__(self) -> object:
        return self._req("enter")

    def __exit__(self, *exc: object) -> None:
        self._req("exit")  # its answer is ignored: a True would swallow a failed assert inside `with`

    def __hash__(self) -> int:
        return object.__hash__(self)

    def _binop(self, op: str, other: object) -> object:
        if isinstance(other, Proxy) and other._peer is self._peer:
            return self._peer.request("binop", op, self, other)
        return NotImplemented

    def __eq__(self, other: object) -> object:  # type: ignore[override]
        return self._binop("eq", other)

    def __ne__(self, other: object) -> object:  # type: ignore[override]
        return self._binop("ne", other)

    def __lt__(self, other: object) -> object:
        return self._binop("lt", other)

    def __le__(self, other: object) -> object:
        return self._binop("le", other)

    def __gt__(self, other: object) -> object:
        return self._binop("gt", other)

    def __ge__(self, other: object) -> object:
        return self._binop("ge", other)

    def __add__(self, other: object) -> object:
        return self._binop("add", other)

    def __sub__(self, other: object) -> object:
        return self._binop("sub", other)

    def __mul__(self, other: object) -> object:
        return self._binop("mul", other)

    def __truediv__(self, other: object) -> object:
        return self._binop("truediv", other)

    def __floordiv__(self, other: object) -> object:
        return self._binop("floordiv", other)

    def __mod__(self, other: object) -> object:
        return self._binop("mod", other)

    def __pow__(self, other: object) -> object:
        return self._binop("pow", other)

    def __matmul__(self, other: object) -> object:
        return self._binop("matmul", other)

    def __and__(self, other: object) -> object:
        return self._binop("and_", other)

    def __or__(self, other: object) -> object:
        return self._binop("or_", other)

    def __xor__(self, other: object) -> object:
        return self._binop("xor", other)

    def __lshift__(self, other: object) -> object:
        return self._binop("lshift", other)

    def __rshift__(self, other: object) -> object:
        return self._binop("rshift", other)


def _typed(value: Any, kind: type, what: str) -> Any:
    if type(value) is not kind:
        raise TypeError(f"{what} of a program object returned {type(value).__name__}, expected {kind.__name__}")
    return value
