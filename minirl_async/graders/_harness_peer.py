"""The code grader's in-sandbox harness, part 4 of 5: `Peer`, one side of the channel between the program
and the judge. `_harness.py` joins the parts into one script (standard library only, Python >= 3.8 at run
time, never imported).

The tests see the program's functions, classes and constants through proxies: a call sends its arguments as
plain data and gets plain data back (`Codec`, part 2), anything else as a proxy (part 3). Top-level
list/dict/set/bytearray arguments are copied back after a call (in-place algorithms); callables the tests
pass are called back in the judge. Names the judge takes from the program exclude builtins (`abs`,
`sorted`, ...) and standard-library module names: those are always the judge's own; a module the program
imported is re-imported by the judge under its own name (`np` for numpy, `pd` for pandas).
"""

import builtins
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # one namespace in the joined script: these imports are for the type checker only
    from minirl_async.graders._harness_proxy import Proxy
    from minirl_async.graders._harness_wire import Channel, ChannelClosed, Codec, ProtocolError, RemoteError

_BINOPS = frozenset(("eq", "ne", "lt", "le", "gt", "ge", "add", "sub", "mul", "truediv", "floordiv", "mod",
                     "pow", "matmul", "and_", "or_", "xor", "lshift", "rshift"))
_UNOPS = frozenset(("neg", "pos", "abs", "invert", "int", "float", "index", "complex"))
_ALIASES = {"np": "numpy", "pd": "pandas", "nx": "networkx", "plt": "matplotlib.pyplot", "sp": "scipy"}
_NO_IMPORT = frozenset(("antigravity", "this", "__hello__", "__phello__", "idlelib", "turtle", "turtledemo",
                        "tkinter", "webbrowser", "pydoc", "ensurepip", "venv", "unittest"))


def _safe_std_types() -> frozenset:
    import datetime
    import io

    return frozenset((io.StringIO, io.BytesIO, datetime.date, datetime.datetime, datetime.time, datetime.timedelta))


_SAFE_STD_TYPES = _safe_std_types()
"""Standard-library value types tests commonly hand to a program (an input stream, a date) whose public
attributes lead nowhere into the judge (taken when the harness starts, before any program code runs)."""


def _harness_types() -> frozenset:
    """The classes of the joined harness script (module `__main__`, like the tests' classes)."""
    return frozenset(v for v in globals().values() if isinstance(v, type) and v.__module__ == __name__)


class Peer(Codec):
    """One side of the channel: encodes values as plain data or handles (`Codec`), serves the other side's
    requests on its own objects, and proxies the other side's objects. `restricted` (the judge) lets the
    program read and write only public attributes of the judge's objects it was given."""

    def __init__(self, chan: Channel, restricted: bool):
        super().__init__()
        self.chan, self.restricted = chan, restricted
        self.exc_classes: dict[int, type] = {}

    # -- requests ------------------------------------------------------------------------------------------

    def request(self, op: str, *args: object) -> object:
        sent = [self.enc(a) for a in args]
        self.chan.send({"k": "req", "op": op, "a": sent})
        try:
            while True:
                msg = self.chan.recv()
                k = msg.get("k")
                if k == "req":
                    self.serve_one(msg)
                    continue
                if k == "ret":
                    try:
                        if op == "call":
                            self._copy_back(args[1], msg.get("mut"))  # type: ignore[arg-type]
                        return self.dec(msg.get("v"))
                    except Exception as e:
                        raise RemoteError(f"the other side sent a value that cannot be decoded "
                                          f"({type(e).__name__}: {str(e)[:200]})") from None
                if k == "exc":
                    exc = self._exception(msg)
                    if isinstance(exc, (StopIteration, StopAsyncIteration)) and op != "next":
                        # only next() ends an iteration: raised by a call it would silently end a map() or
                        # a loop of the tests (`all(map(check, cases))` true), so it fails as PEP 479 does
                        raise RuntimeError(f"{type(exc).__name__} raised by the other side's {op}") from None
                    raise exc
                raise ProtocolError(f"unexpected message {str(k)[:40]!r}")
        except ChannelClosed:
            raise RemoteError("the program ended (it exited, crashed or was killed) during the call") from None
        except ProtocolError as e:
            raise RemoteError(f"the program broke the protocol: {e}") from None

    def _copy_back(self, args: list, mut: object) -> None:
        if type(mut) is not list:
            return
        for item in mut:
            if type(item) is not list or len(item) != 2 or type(item[0]) is not int or not 0 <= item[0] < len(args):
                continue
            orig, new = args[item[0]], self.dec(item[1])
            if type(orig) is list and type(new) is list or type(orig) is bytearray and type(new) is bytearray:
                orig[:] = new
            elif type(orig) is dict and type(new) is dict or type(orig) is set and type(new) is set:
                orig.clear()
                orig.update(new)

    def _exception(self, msg: dict) -> BaseException:
        name, text = str(msg.get("name"))[:200], str(msg.get("msg"))[:10000]
        cid = msg.get("cls")
        cls = self.exc_classes.get(cid) if type(cid) is int else None
        if cls is None:
            for cand in (name, msg.get("base")):
                b = getattr(builtins, cand, None) if type(cand) is str else None
                if isinstance(b, type) and issubclass(b, Exception):
                    cls = b
                    break
        if cls is None:
            return RemoteError(f"{name}: {text}")
        try:
            args = msg.get("args")
            return cls(*(self.dec(a) for a in args)) if type(args) is list else cls(text)  # type: ignore[no-any-return]
        except Exception:
            try:
                return cls(text)  # type: ignore[no-any-return]
            except Exception:
                return RemoteError(f"{name}: {text}")

    def _exc_msg(self, e: BaseException) -> dict:
        cls = type(e)
        base = next((c.__name__ for c in cls.__mro__ if c.__module__ == "builtins"), "Exception")
        try:
            text = str(e)
        except Exception:
            text = "<unprintable>"
        try:
            args: object = [self.enc(a) for a in e.args]
        except Exception:
            args = None
        return {"k": "exc", "name": cls.__name__[:200], "msg": text[:10000], "base": base,
                "cls": self.mine_ids.get(id(cls)), "args": args}

    def _mine(self, x: object) -> object:
        if isinstance(x, Proxy):
            raise TypeError("not an object of this side")
        return x

    def _reachable(self, obj: object) -> object:
        """On the judge's side, the program may use attributes only of instances of classes the TESTS define
        (a tree node, a test double). Public attributes of anything else lead back into the judge: a
        generator's `gi_frame.f_globals["__builtins__"].exec`, a traceback's `tb_frame`, a module's members.
        The tests run as `__main__` in their own namespace; the harness's classes are `__main__` too, so they
        are named and refused."""
        if not self.restricted:
            return obj
        cls = type(obj)
        if cls in _SAFE_STD_TYPES:
            return obj
        if cls.__module__ != "__main__" or isinstance(obj, type) or cls in _harness_types():
            raise AttributeError(f"the program may use attributes only of instances of classes the tests "
                                 f"define (or of {', '.join(sorted(t.__name__ for t in _SAFE_STD_TYPES))}), "
                                 f"not of a {cls.__name__}")
        return obj

    def _public(self, name: object) -> str:
        if type(name) is not str:
            raise TypeError("attribute names are strings")
        if self.restricted and name.startswith("_"):
            raise AttributeError(f"the program may not use the private attribute {name!r} of a test object")
        return name

    def _do(self, op: str, a: list) -> tuple[object, list]:
        import operator

        mut: list = []
        if op == "call":
            fn, pos, kw = a[0], a[1], a[2]
            if type(pos) is not list or type(kw) is not dict or not all(type(k) is str for k in kw):
                raise ProtocolError("bad call")
            before = [self.enc(p) if type(p) in (list, dict, set, bytearray) else None for p in pos]
            result = self._mine(fn)(*pos, **kw)  # type: ignore[operator]
            for i, p in enumerate(pos):
                if before[i] is not None:
                    now = self.enc(p)
                    if now != before[i]:
                        mut.append([i, now])
            return result, mut
        obj = self._mine(a[0])
        if op == "getattr":
            return getattr(self._reachable(obj), self._public(a[1])), mut
        if op == "setattr":
            setattr(self._reachable(obj), self._public(a[1]), a[2])
            return None, mut
        if op == "delattr":
            delattr(self._reachable(obj), self._public(a[1]))
            return None, mut
        if op == "getitem":
            return obj[a[1]], mut  # type: ignore[index]
        if op == "setitem":
            obj[a[1]] = a[2]  # type: ignore[index]
            return None, mut
        if op == "delitem":
            del obj[a[1]]  # type: ignore[attr-defined]
            return None, mut
        if op == "iter":
            return iter(obj), mut  # type: ignore[call-overload]
        if op == "next":
            return next(obj), mut  # type: ignore[call-overload]
        if op == "len":
            return len(obj), mut  # type: ignore[arg-type]
        if op == "bool":
            return bool(obj), mut
        if op == "contains":
            return a[1] in obj, mut  # type: ignore[operator]
        if op == "str":
            return str(obj), mut
        if op == "repr":
            return repr(obj), mut
        if op == "enter":
            return obj.__enter__(), mut  # type: ignore[attr-defined]
        if op == "exit":
            return obj.__exit__(None, None, None), mut  # type: ignore[attr-defined]
        if op == "unop" and a[1] in _UNOPS:
            f = {"int": int, "float": float, "complex": complex}.get(a[1]) or getattr(operator, a[1])  # type: ignore[call-overload]
            return f(obj), mut
        if op == "binop" and len(a) == 3 and a[0] in _BINOPS:
            return getattr(operator, a[0])(self._mine(a[1]), self._mine(a[2])), mut  # type: ignore[arg-type]
        raise ProtocolError(f"unknown request {str(op)[:40]!r}")

    def serve_one(self, msg: dict) -> None:
        try:
            args = msg.get("a")
            if type(args) is not list:
                raise ProtocolError("bad request")
            result, mut = self._do(str(msg.get("op")), [self.dec(x) for x in args])
            reply: dict = {"k": "ret", "v": self.enc(result)}
            if mut:
                reply["mut"] = mut
        except ChannelClosed:
            raise
        except BaseException as e:  # noqa: BLE001 - the other side gets it as an exception of the call
            reply = self._exc_msg(e)
        try:
            self.chan.send(reply)
        except (ValueError, MemoryError) as e:  # over the size limit: the caller gets it as the call's exception
            reply = {}
            self.chan.send(self._exc_msg(MemoryError(f"the result is too large to send ({type(e).__name__})")))

    def serve_forever(self) -> None:
        while True:
            try:
                msg = self.chan.recv()
            except (ChannelClosed, ProtocolError):
                return
            if msg.get("k") == "req":
                self.serve_one(msg)

    # -- start-up ------------------------------------------------------------------------------------------

    def export(self, namespace: dict) -> list:
        """The program's globals as (name, value) for the judge: plain data, handles, modules by name."""
        import types

        out: list[Any] = []
        for name, val in list(namespace.items()):
            if type(name) is not str or name.startswith("__"):
                continue
            if isinstance(val, types.ModuleType):
                out.append([name, {"t": "module", "name": str(getattr(val, "__name__", ""))[:200]}])
            elif isinstance(val, type) and issubclass(val, BaseException):
                base = next((c.__name__ for c in val.__mro__ if c.__module__ == "builtins"), "Exception")
                out.append([name, {"t": "exc_class", "id": self.handle(val), "base": base}])
            else:
                try:
                    e = self.enc(val)
                    if len(json.dumps(e)) > (1 << 20):
                        e = self.ref(val)
                except Exception:
                    e = self.ref(val)
                out.append([name, e])
        return out

    def judge_namespace(self, exported: object) -> dict:
        """The tests' globals: the program's names, minus builtins and standard-library module names."""
        import importlib

        ns: dict = {"__name__": "__main__", "__builtins__": builtins}
        stdlib = getattr(sys, "stdlib_module_names", frozenset(sys.builtin_module_names))
        if type(exported) is not list:
            raise ProtocolError("bad start-up message")
        for item in exported:
            if type(item) is not list or len(item) != 2 or type(item[0]) is not str:
                continue
            name, v = item
            if not name.isidentifier() or name.startswith("__") or hasattr(builtins, name):
                continue
            kind = v.get("t") if type(v) is dict else None
            if kind == "module":
                mod = v.get("name")
                ok = type(mod) is str and all(p.isidentifier() for p in mod.split(".")) and \
                    mod.split(".")[0] not in _NO_IMPORT and (mod.rsplit(".", 1)[-1] == name or _ALIASES.get(name) == mod)
                if ok:
                    try:
                        ns[name] = importlib.import_module(mod)
                    except Exception:
                        pass
                continue
            if name in stdlib:
                continue
            if kind == "exc_class":
                base = getattr(builtins, str(v.get("base")), None)
                if not (isinstance(base, type) and issubclass(base, Exception)):
                    base = Exception
                cls = type(name, (base,), {"__module__": "__main__"})
                if type(v.get("id")) is int:
                    self.exc_classes[v["id"]] = cls
                ns[name] = cls
                continue
            try:
                ns[name] = self.dec(v)
            except Exception:  # a value that cannot be decoded is left out: the tests then miss that name
                continue
        return ns

