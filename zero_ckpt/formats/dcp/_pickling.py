"""A small pickler for stand-ins of objects whose classes are never imported (no torch here).

:class:`Global` names a class or function (``module.name``) and is written as a ``GLOBAL``
opcode; :class:`Reduce` is ``func(*args)`` (``REDUCE``); :class:`NewObj` is
``cls.__new__(cls)`` then ``BUILD`` with ``state`` (how protocol 2 pickles a dataclass);
:class:`PersistentId` is written as a persistent id (``BINPERSID``), how ``torch.save`` names a
tensor storage. Everything else (dict, list, tuple, str, int, float, bool, None, bytes) is
pickled as the standard pickler pickles it, protocol 2 (what ``torch.save`` writes).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from typing import Any

__all__ = ["Global", "Reduce", "NewObj", "PersistentId", "dumps"]


@dataclass(frozen=True)
class Global:
    module: str
    name: str


@dataclass(eq=False)
class Reduce:
    func: Global
    args: tuple


@dataclass(eq=False)
class NewObj:
    cls: Global
    state: Any = None


@dataclass(eq=False)
class PersistentId:
    value: tuple


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file: Any) -> None:
        super().__init__(file, protocol=2)
        self._globals: dict[Global, Global] = {}

    def persistent_id(self, obj: Any) -> Any:  # noqa: D401 - pickle API
        if isinstance(obj, PersistentId):
            return obj.value
        return None

    def _save_global(self, obj: Global) -> None:
        # one instance per name, so a second use is a memo lookup (BINGET), as pickle does
        obj = self._globals.setdefault(obj, obj)
        memo = self.memo.get(id(obj))
        if memo is not None:
            self.write(self.get(memo[0]))
            return
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
        self.memoize(obj)

    def _save_reduce(self, obj: Reduce) -> None:
        self.save(obj.func)
        self.save(tuple(obj.args))
        self.write(pickle.REDUCE)
        self.memoize(obj)

    def _save_newobj(self, obj: NewObj) -> None:
        self.save(obj.cls)
        self.save(())
        self.write(pickle.NEWOBJ)
        self.memoize(obj)
        if obj.state is not None:
            self.save(obj.state)
            self.write(pickle.BUILD)

    dispatch[Global] = _save_global
    dispatch[Reduce] = _save_reduce
    dispatch[NewObj] = _save_newobj


def dumps(obj: Any) -> bytes:
    """The protocol 2 pickle of ``obj`` (stand-ins included)."""
    buf = io.BytesIO()
    _Pickler(buf).dump(obj)
    return buf.getvalue()
