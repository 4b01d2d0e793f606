"""
GGUF files (llama.cpp's format), read with every length checked before it is trusted.

    read_gguf(path) -> GGUFFile: .meta {key: value}, .tensors {name: GGUFTensor}, .tensor(name) -> float32
    copy_tokenizer(src, dst)   a tensor-free GGUF holding src's tokenizer: what a checkpoint keeps

The layout (little-endian, version 2 or 3): "GGUF", version, tensor count, key-value count; the
key-values (a key string, a type, a value; arrays hold one type); the tensor table (name, dims with the
fastest-varying first, ggml type, offset into the data); then, aligned to `general.alignment`, the data.
A crafted header can claim anything: 2^60 tensors, a string longer than the file, a tensor that ends past
the end. So every count and length is checked against the bytes that are left before anything is read
or allocated, and every tensor's byte range against the file's size, and the first failure stops the
read with one line naming the file and what is wrong. The metadata is parsed here; dequantization is the
`gguf` package's (`gguf.quants.dequantize`), which knows every ggml block format.
How nanoVT maps a GGUF LLM onto its Decoder: weights.py (gguf_names, decoder_config_from_gguf) and
docs/weights.md §GGUF.
"""

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from errors import InputError

MAGIC = b"GGUF"
MAX_DIMS = 4              # ggml's GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

# value types of the key-value section: struct format (None: string / array, read by hand)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}


class GGUFError(InputError):
    """A file that is not a GGUF nanoVT can read; the message names the file (a user's error: one line)."""


@dataclass
class GGUFTensor:
    name: str
    shape: tuple          # PyTorch order (slowest first): a ggml [ne0, ne1] matrix is (ne1, ne0)
    ggml_type: int
    start: int            # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self):
        import gguf
        try:
            return gguf.GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"


def _type_sizes(t):
    """(elements per block, bytes per block) of ggml type t, or None when the gguf package does not know it."""
    import gguf
    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t)]
    except (ValueError, KeyError):
        return None


class _Cursor:
    """Reads little-endian fields from a buffer, refusing any read past its end."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what):
        raise GGUFError(f"{self.path}: {what} (at byte {self.pos} of {self.size}: truncated or not a GGUF file?)")

    def need(self, n, what):
        if n < 0 or n > self.size - self.pos:
            self.fail(f"{what} needs {n} bytes, {self.size - self.pos} are left")

    def scalar(self, fmt, what):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what):
        n = self.scalar("Q", what + "'s length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")  # a token may be a lone byte; keep the rest readable

    def value(self, vtype, what):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype, count = self.scalar("I", what + "'s element type"), self.scalar("Q", what + "'s length")
            if etype in _NUMPY:  # numbers: one view of the bytes, after checking they are there
                n = np.dtype(_NUMPY[etype]).itemsize
                self.need(count * n, f"{what} ({count} numbers)")
                a = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
                self.pos += count * n
                return a
            if etype == _STRING:  # each string at least its 8-byte length: bound the count first
                self.need(count * 8, f"{what} ({count} strings)")
                return [self.string(f"{what}[{i}]") for i in range(count)]
            self.fail(f"{what}: arrays of type {etype} are not supported")
        self.fail(f"{what}: unknown value type {vtype}")


class GGUFFile:
    """An open GGUF file: metadata and the tensor table read and checked, tensor data memory-mapped."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise GGUFError(f"{self.path}: not a regular file")
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 24:
                raise GGUFError(f"{self.path}: {os.fstat(f.fileno()).st_size} bytes, too short for a GGUF header")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        c = _Cursor(memoryview(self._map), self.path)
        if bytes(self._map[:4]) != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (starts with {bytes(self._map[:4])!r}, not b'GGUF')")
        c.pos = 4
        self.version = c.scalar("I", "version")
        if self.version not in (2, 3):
            hint = " (a big-endian file?)" if self.version > 0xFFFF else ""
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3){hint}")
        n_tensors, n_kv = c.scalar("Q", "tensor count"), c.scalar("Q", "key-value count")
        # every key-value is at least 13 bytes (key length, a 1-char key, type, a byte), every tensor entry 33
        if n_kv * 13 > c.size - c.pos or n_tensors * 33 > c.size - c.pos:
            c.fail(f"the header claims {n_tensors} tensors and {n_kv} key-values, more than the file can hold")
        self.meta, self.kv_bytes = {}, {}
        for i in range(n_kv):
            start = c.pos
            key = c.string(f"key {i}")
            self.meta[key] = c.value(c.scalar("I", f"{key!r}'s type"), repr(key))
            self.kv_bytes[key] = (start, c.pos)  # the entry as stored: copy_tokenizer writes it out unchanged
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor {i}'s name")
            nd = c.scalar("I", f"tensor {name!r}'s number of dimensions")
            if not 1 <= nd <= MAX_DIMS:
                c.fail(f"tensor {name!r} has {nd} dimensions (1 to {MAX_DIMS})")
            dims = [c.scalar("Q", f"tensor {name!r}'s dimension {d}") for d in range(nd)]
            infos.append((name, dims, c.scalar("I", f"tensor {name!r}'s type"), c.scalar("Q", f"tensor {name!r}'s offset")))
        align = self.meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"{self.path}: general.alignment {align!r} is not a power of two")
        data_start = -(-c.pos // align) * align
        self.tensors = {}
        for name, dims, t, off in infos:
            self.tensors[name] = self._checked_tensor(name, dims, t, off, data_start, align)

    def _checked_tensor(self, name, dims, t, off, data_start, align):
        where = f"{self.path}: tensor {name!r}"
        if name in self.tensors:
            raise GGUFError(f"{where} appears twice")
        sizes = _type_sizes(t)
        if sizes is None:
            raise GGUFError(f"{where} has ggml type {t}, which the gguf package does not know")
        block, type_size = sizes
        if any(d == 0 for d in dims) or dims[0] % block:
            raise GGUFError(f"{where} has dims {dims}: empty, or a row not a whole number of {block}-element blocks")
        nbytes, size = dims[0] // block * type_size, len(self._map)
        for d in dims[1:]:
            nbytes *= d
            if nbytes > size:  # stop multiplying as soon as it cannot fit: no huge numbers, no allocation
                break
        start = data_start + off
        if off % align or nbytes > size or start > size - nbytes:
            raise GGUFError(f"{where} (dims {dims}, {nbytes} bytes at data offset {off}) lies outside the "
                            f"{size}-byte file or is misaligned")
        return GGUFTensor(name, tuple(reversed(dims)), t, start, nbytes)

    def raw(self, name):
        """The tensor's bytes as a uint8 array of shape (rows..., bytes per row), without a copy."""
        info = self.tensors[name]
        a = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.start)
        return a.reshape(*info.shape[:-1], -1)

    def tensor(self, name):
        """The tensor dequantized to a float32 numpy array of its PyTorch shape."""
        import gguf
        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(info.ggml_type)
        raw = self.raw(name)
        if qtype == gguf.GGMLQuantizationType.F32:
            out = raw.view(np.float32).copy()  # a copy: the map is read-only
        elif qtype == gguf.GGMLQuantizationType.F16:
            out = raw.view(np.float16).astype(np.float32)
        else:
            try:
                out = gguf.quants.dequantize(raw, qtype)
            except NotImplementedError:
                raise GGUFError(f"{self.path}: tensor {name!r} is {qtype.name}, which the gguf package "
                                f"cannot dequantize") from None
        return np.ascontiguousarray(out.reshape(info.shape), dtype=np.float32)

def copy_tokenizer(src, dst):
    """Write `dst`, a GGUF with no tensors and only `src`'s general.architecture and tokenizer.* entries,
    byte for byte: what a checkpoint keeps as its tokenizer.model when the tokenizer came from a GGUF LLM
    (the vocabulary and merges without the weights)."""
    g = GGUFFile(src) if not isinstance(src, GGUFFile) else src
    keys = [k for k in g.kv_bytes if k == "general.architecture" or k.startswith("tokenizer.")]
    tmp = str(dst) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<IQQ", g.version, 0, len(keys)))
        for k in keys:
            a, b = g.kv_bytes[k]
            f.write(g._map[a:b])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    return dst


def read_gguf(path):
    return GGUFFile(path)


def is_gguf(path):
    """Whether `path` is a regular file that starts with the GGUF magic."""
    try:
        if not os.path.isfile(path):
            return False
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False
