"""Typed, versioned, size-bounded messages: the wire format of the peer protocol.

Owns framing, the body encoding and schema validation; knows nothing about streams.

Frame (6-byte header, then the body):

    version u8 (= VERSION) | type u8 (1..255) | length u32 big-endian | body

Body: the message's fields in schema order, each as a tagged value, so a body is
self-describing and checked twice (the tag must be the one the schema expects):

    0x01 u8 | 0x02 u16 | 0x03 u32 | 0x04 u64   unsigned integer, big-endian, in the
                                              shortest width that holds it
    0x05 false | 0x06 true
    0x07 bytes   u32 length, then the bytes
    0x08 text    u32 length, then UTF-8 (strict: no surrogates, no invalid sequences)
    0x09 list    u32 count, then that many tagged items
    0x0A none    an Optional field that is absent
    0x0B record  the nested record's fields, in its schema order

Decoding is strict and canonical: every field present in order, integers within their
range and in minimal width, lengths and counts within the schema's bounds, no trailing
bytes. One message has exactly one encoding, so encodings can be hashed or signed.
`decode` raises `ProtocolError` (and nothing else) on any malformed input; `encode`
raises it on a message that breaks its own schema or a size bound.

Declaring messages:

    PEER = Registry("peer", max_frame=8 << 20)

    @message(PEER, 0x20)  # what PEER.message(0x20) does, in the form type checkers see through
    class GetBlob:
        blob_id: bytes = field(Bytes(32, min_len=32))
        offset: int = field(UInt(1 << 40))

Type ids 0x01..0x0F are reserved for the core messages (`Ping`, `Pong`, `Error`) that
every registry contains.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any, Callable, TypeVar, dataclass_transform, overload

_T = TypeVar("_T")

VERSION = 1
HEADER = struct.Struct(">BBI")
HEADER_SIZE = HEADER.size
HARD_MAX_FRAME = 8 << 20  # no registry may allow more (a 4 MiB chunk, padded, fits)
DEFAULT_MAX_FRAME = 64 << 10
_MAX_DEPTH = 8  # nesting of lists / structs


class ProtocolError(Exception):
    """Malformed, unknown-version or oversized input (or an invalid message to encode)."""


class UnknownMessage(ProtocolError):
    """A well-formed frame whose type this registry does not know (peer may be newer)."""

    def __init__(self, type_id: int):
        super().__init__(f"unknown message type {type_id:#x}")
        self.type_id = type_id


# --------------------------------------------------------------------------- field kinds

_U8, _U16, _U32, _U64, _FALSE, _TRUE, _BYTES, _TEXT, _LIST, _NONE, _RECORD = range(1, 12)
_UINTS = ((_U8, 0xFF, struct.Struct(">B")), (_U16, 0xFFFF, struct.Struct(">H")),
          (_U32, 0xFFFF_FFFF, struct.Struct(">I")), (_U64, 0xFFFF_FFFF_FFFF_FFFF, struct.Struct(">Q")))
_LEN = struct.Struct(">I")


class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: memoryview, pos: int, end: int):
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int) -> memoryview:
        if n > self.end - self.pos:
            raise ProtocolError("truncated body")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def tag(self) -> int:
        return self.take(1)[0]

    def length(self, limit: int, what: str) -> int:
        n = _LEN.unpack(self.take(4))[0]
        if n > limit:
            raise ProtocolError(f"{what} of {n} exceeds the limit of {limit}")
        return n


class Kind:
    """A field type: validates a Python value, encodes it, decodes it."""

    def check(self, value: Any) -> None:
        raise NotImplementedError

    def put(self, out: bytearray, value: Any) -> None:
        raise NotImplementedError

    def get(self, r: _Reader, depth: int) -> Any:
        raise NotImplementedError


class UInt(Kind):
    """An unsigned integer within `min`..`max` (at most 64 bits), sent in its shortest width."""

    def __init__(self, max: int = _UINTS[-1][1], min: int = 0):
        if not 0 <= min <= max <= _UINTS[-1][1]:
            raise ValueError("UInt bounds must satisfy 0 <= min <= max < 2**64")
        self.min, self.max = min, max

    def check(self, value):
        if type(value) is not int or not self.min <= value <= self.max:
            raise ProtocolError(f"integer {value!r} outside {self.min}..{self.max}")

    def put(self, out, value):
        for tag, top, fmt in _UINTS:
            if value <= top:
                out.append(tag)
                out += fmt.pack(value)
                return

    def get(self, r, depth):
        tag = r.tag()
        for i, (t, _top, fmt) in enumerate(_UINTS):
            if tag == t:
                value = fmt.unpack(r.take(fmt.size))[0]
                if i and value <= _UINTS[i - 1][1]:
                    raise ProtocolError("integer not in its shortest encoding")
                self.check(value)
                return value
        raise ProtocolError(f"expected an integer, got tag {tag:#x}")


class Bool(Kind):
    """True or false (a tag of its own, no payload)."""

    def check(self, value):
        if type(value) is not bool:
            raise ProtocolError(f"expected a bool, got {type(value).__name__}")

    def put(self, out, value):
        out.append(_TRUE if value else _FALSE)

    def get(self, r, depth):
        tag = r.tag()
        if tag not in (_FALSE, _TRUE):
            raise ProtocolError(f"expected a bool, got tag {tag:#x}")
        return tag == _TRUE


class Bytes(Kind):
    """A byte string of `min_len`..`max_len` bytes."""

    def __init__(self, max_len: int, min_len: int = 0):
        if not 0 <= min_len <= max_len <= HARD_MAX_FRAME:
            raise ValueError("Bytes bounds must satisfy 0 <= min_len <= max_len <= HARD_MAX_FRAME")
        self.min_len, self.max_len = min_len, max_len

    def check(self, value):
        if type(value) is not bytes:
            raise ProtocolError(f"expected bytes, got {type(value).__name__}")
        if not self.min_len <= len(value) <= self.max_len:
            raise ProtocolError(f"{len(value)} bytes outside {self.min_len}..{self.max_len}")

    def put(self, out, value):
        out.append(_BYTES)
        out += _LEN.pack(len(value))
        out += value

    def get(self, r, depth):
        if (tag := r.tag()) != _BYTES:
            raise ProtocolError(f"expected bytes, got tag {tag:#x}")
        value = bytes(r.take(r.length(self.max_len, "byte string")))
        if len(value) < self.min_len:
            raise ProtocolError(f"byte string shorter than {self.min_len}")
        return value


class Text(Kind):
    """UTF-8 text; `max_len` counts encoded bytes."""

    def __init__(self, max_len: int):
        if not 0 <= max_len <= HARD_MAX_FRAME:
            raise ValueError("Text max_len out of range")
        self.max_len = max_len

    def check(self, value):
        if type(value) is not str:
            raise ProtocolError(f"expected str, got {type(value).__name__}")
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise ProtocolError("text is not valid Unicode (lone surrogate)") from None
        if n > self.max_len:
            raise ProtocolError(f"text of {n} bytes exceeds {self.max_len}")

    def put(self, out, value):
        raw = value.encode("utf-8")
        out.append(_TEXT)
        out += _LEN.pack(len(raw))
        out += raw

    def get(self, r, depth):
        if (tag := r.tag()) != _TEXT:
            raise ProtocolError(f"expected text, got tag {tag:#x}")
        raw = r.take(r.length(self.max_len, "text"))
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("text is not valid UTF-8") from None


class List(Kind):
    """A sequence (decoded as a tuple) of at most `max_items` items of one kind."""

    def __init__(self, item: Kind, max_items: int):
        if not isinstance(item, Kind) or not 0 <= max_items <= HARD_MAX_FRAME:
            raise ValueError("List needs an item Kind and 0 <= max_items")
        self.item, self.max_items = item, max_items

    def check(self, value):
        if type(value) not in (list, tuple):
            raise ProtocolError(f"expected a list, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise ProtocolError(f"{len(value)} items exceed {self.max_items}")
        for v in value:
            self.item.check(v)

    def put(self, out, value):
        out.append(_LIST)
        out += _LEN.pack(len(value))
        for v in value:
            self.item.put(out, v)

    def get(self, r, depth):
        if (tag := r.tag()) != _LIST:
            raise ProtocolError(f"expected a list, got tag {tag:#x}")
        if depth >= _MAX_DEPTH:
            raise ProtocolError("nesting too deep")
        n = r.length(self.max_items, "list")
        if n > r.end - r.pos:  # every item takes at least one byte: fail before looping
            raise ProtocolError("truncated list")
        return tuple(self.item.get(r, depth + 1) for _ in range(n))


class Optional(Kind):
    """A value of `inner` kind, or None (sent as the `none` tag)."""

    def __init__(self, inner: Kind):
        if not isinstance(inner, Kind) or isinstance(inner, Optional):
            raise ValueError("Optional needs a non-Optional Kind")
        self.inner = inner

    def check(self, value):
        if value is not None:
            self.inner.check(value)

    def put(self, out, value):
        if value is None:
            out.append(_NONE)
        else:
            self.inner.put(out, value)

    def get(self, r, depth):
        if r.pos < r.end and r.data[r.pos] == _NONE:
            r.pos += 1
            return None
        return self.inner.get(r, depth)


class Record(Kind):
    """A nested `@record` class (a group of fields without a type id)."""

    def __init__(self, cls: type):
        if not hasattr(cls, "_wire"):
            raise ValueError("Record needs a class decorated with @record")
        self.cls = cls

    def check(self, value):
        if type(value) is not self.cls:
            raise ProtocolError(f"expected {self.cls.__name__}, got {type(value).__name__}")
        _check_fields(value)

    def put(self, out, value):
        out.append(_RECORD)
        _put_fields(out, value)

    def get(self, r, depth):
        if (tag := r.tag()) != _RECORD:
            raise ProtocolError(f"expected a record, got tag {tag:#x}")
        if depth >= _MAX_DEPTH:
            raise ProtocolError("nesting too deep")
        return _get_fields(self.cls, r, depth + 1)


def field(kind: Kind, **kwargs: Any) -> Any:
    """Declare a message field of the given wire `kind` (dataclass field)."""
    if not isinstance(kind, Kind):
        raise TypeError("field() needs a Kind")
    return dataclasses.field(metadata={"wire": kind}, **kwargs)


def _check_fields(msg) -> None:
    for name, kind in msg._wire:
        kind.check(getattr(msg, name))


def _put_fields(out: bytearray, msg) -> None:
    for name, kind in msg._wire:
        kind.put(out, getattr(msg, name))


def _get_fields(cls, r: _Reader, depth: int):
    values = {name: kind.get(r, depth) for name, kind in cls._wire}
    return cls(**values)


# `dataclass_transform` tells type checkers that these decorators make dataclasses (frozen, with
# `field` declaring the fields), so they see each message's fields and its __init__.
@overload
def record(cls: type[_T]) -> type[_T]: ...
@overload
def record(cls: None = None) -> Callable[[type[_T]], type[_T]]: ...
@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def record(cls=None):
    """Class decorator: a frozen dataclass whose fields all have wire kinds."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        wire = []
        for f in dataclasses.fields(cls):
            kind = f.metadata.get("wire")
            if kind is None:
                raise TypeError(f"{cls.__name__}.{f.name} has no wire kind (use codec.field)")
            wire.append((f.name, kind))
        cls._wire = tuple(wire)
        return cls

    return wrap(cls) if cls is not None else wrap


# --------------------------------------------------------------------------- frames

class Registry:
    """The message types one protocol speaks, and its frame size bound."""

    def __init__(self, name: str, max_frame: int = DEFAULT_MAX_FRAME, *, core: bool = True):
        if not HEADER_SIZE < max_frame <= HARD_MAX_FRAME:
            raise ValueError(f"max_frame must be within {HEADER_SIZE + 1}..{HARD_MAX_FRAME}")
        self.name = name
        self.max_frame = max_frame
        self._types: dict[int, type] = {}
        if core:
            self._types.update(_CORE)

    @dataclass_transform(frozen_default=True, field_specifiers=(field,))
    def message(self, type_id: int) -> Callable[[type[_T]], type[_T]]:
        """Class decorator: declare a message type of this registry.

        mypy does not honour `dataclass_transform` on a method (python/mypy#16527): declare messages
        with the module-level `message(registry, type_id)`, which does the same and which it does."""

        def wrap(cls):
            if not 0x10 <= type_id <= 0xFF:
                raise ValueError("message type ids 0x10..0xFF are free (0x01..0x0F are core)")
            if type_id in self._types:
                raise ValueError(f"type id {type_id:#x} already used by {self._types[type_id].__name__}")
            cls = record(cls)
            cls.TYPE = type_id
            self._types[type_id] = cls
            return cls

        return wrap

    def types(self) -> dict[int, type]:
        return dict(self._types)

    def encode(self, msg) -> bytes:
        type_id = getattr(type(msg), "TYPE", None)
        if type_id is None or self._types.get(type_id) is not type(msg):
            raise ProtocolError(f"{type(msg).__name__} is not a message of {self.name}")
        return encode(msg, self.max_frame)

    def decode_header(self, header: bytes | bytearray | memoryview) -> tuple[int, int]:
        """(type, body length) from the first HEADER_SIZE bytes of a frame."""
        if len(header) != HEADER_SIZE:
            raise ProtocolError("truncated frame header")
        version, type_id, length = HEADER.unpack(header)
        if version != VERSION:
            raise ProtocolError(f"unsupported frame version {version}")
        if HEADER_SIZE + length > self.max_frame:
            raise ProtocolError(f"frame of {HEADER_SIZE + length} bytes exceeds {self.max_frame}")
        return type_id, length

    def decode(self, data) -> Any:
        """The message in `data` (exactly one frame); `ProtocolError` if malformed."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError("frame must be bytes")
        view = memoryview(data).cast("B")
        type_id, length = self.decode_header(view[:HEADER_SIZE])
        if len(view) != HEADER_SIZE + length:
            raise ProtocolError(f"frame length {len(view)} does not match its header ({HEADER_SIZE + length})")
        cls = self._types.get(type_id)
        if cls is None:
            raise UnknownMessage(type_id)
        r = _Reader(view, HEADER_SIZE, len(view))
        msg = _get_fields(cls, r, 0)
        if r.pos != r.end:
            raise ProtocolError("trailing bytes after the last field")
        return msg


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def message(registry: Registry, type_id: int) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: declare a message type of `registry` (as `registry.message(type_id)` does)."""
    return registry.message(type_id)


def encode(msg, max_frame: int = HARD_MAX_FRAME) -> bytes:
    """The frame of `msg` (validated against its schema and `max_frame`)."""
    type_id = getattr(type(msg), "TYPE", None)
    if type_id is None or not hasattr(msg, "_wire"):
        raise ProtocolError(f"{type(msg).__name__} is not a message")
    _check_fields(msg)
    out = bytearray(HEADER_SIZE)
    _put_fields(out, msg)
    if len(out) > min(max_frame, HARD_MAX_FRAME):
        raise ProtocolError(f"message of {len(out)} bytes exceeds the frame limit {min(max_frame, HARD_MAX_FRAME)}")
    HEADER.pack_into(out, 0, VERSION, type_id, len(out) - HEADER_SIZE)
    return bytes(out)


def decode(data, registry: "Registry | None" = None):
    """The message in `data`, decoded with `registry` (default: the core messages)."""
    return (registry or CORE).decode(data)


# --------------------------------------------------------------------------- core messages

_CORE: dict[int, type] = {}  # type id -> core message class (in every registry)


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def _core(type_id: int) -> Callable[[type[_T]], type[_T]]:
    def wrap(cls):
        cls = record(cls)
        cls.TYPE = type_id
        _CORE[type_id] = cls
        return cls

    return wrap


@_core(0x01)
class Ping:
    """A liveness probe, in every registry: a store sends it to its broker as a keepalive; the reply
    is `Pong` with the same nonce (or an `Error` where no handler serves it)."""

    nonce: int = field(UInt())


@_core(0x02)
class Pong:
    """The reply to `Ping`: its nonce, echoed."""

    nonce: int = field(UInt())


@_core(0x03)
class Error:
    """A refusal or failure, as the reply to a request. `message` is for humans and
    must never carry secrets."""

    code: int = field(UInt(0xFFFF))
    message: str = field(Text(200))


class ErrorCode:
    """The core `Error` codes `bpfs.net.rpc` replies with; protocols add their own from 16 up."""

    UNSUPPORTED = 1  # unknown message type, or no handler for it
    RATE_LIMITED = 2
    INTERNAL = 3
    REJECTED = 4  # the handler refused (see the message)


CORE = Registry("core")
