"""
Data for nanoVT: LLaVA-1.5's images and datasets.

Read top to bottom:
  1. images         LLaVA-1.5's recipe: pad to square with the CLIP mean colour, CLIP resize,
                    centre crop, normalise
  2. datasets       LLaVA JSON conversations (stages I, II, IV), images only (stage III),
                    the read cache shared by a node's processes, collate, length-grouped sharded
                    sampler
A conversation becomes (input_ids, labels) in conversation.py (templates, LLaVA-1.5's labels);
the tokenizers are in tokenizer.py.

Bad input (LlavaDataset / ImageOnlyDataset). Default: skip the sample, log one warning with
its id and reason, count it (`.skipped`, `.report()`); with strict=True raise instead. Found when
the file is read, before step 1, so the sampler only ever serves usable samples:
  - malformed JSON            ValueError naming file, line and column; JSON Lines content in a
                              .json file, and bytes that are not UTF-8 (file, byte offset, line),
                              get their own messages; a UTF-8 byte-order mark is accepted. These
                              fail even when strict=False (nothing to skip to).
  - LLaVA's repairs           a first turn from "gpt" is dropped (LLaVA: source[1:]); a last human
                              turn without an answer is dropped, the answered turns kept. Counted
                              in `.repaired` and the report.
  - empty conversations, turns not alternating human/gpt, a single unanswered question, two
    <image> tags, <image> in an assistant turn, <image> but no "image" field, an "image" field
    that is not a string (a list, a number)          skipped with the reason
  - "image" field but no <image> tag   LLaVA's data always has the tag; we prepend "<image>\n"
                              to the first human turn (the JSON says the image belongs there)
  - missing image files       a parallel scan of every path; skipped, with one summary "N of M
                              images missing, by folder" (a missing sub-folder never stops a run)
  - image paths outside image_folder (absolute, or climbing out with ..) unless allow_outside
  - more than `max_missing` of the image samples missing (an unmounted folder): an InputError
    naming the folder, before step 1
Found when an item is loaded; the loader then serves the next sample instead, so a run never
crashes at step 40,000 (strict: raise), and the skip reaches the main process with the batch:
  - whatever the image gate refuses (open_image): a special file (FIFO, device), a corrupt or
    truncated image, one over `max_pixels` decoded or padded to its square (decompression bomb),
    a symlink that leaves image_folder
  - a sample whose image block does not fit in max_len, or with no answer left after truncation
"""

import array
import codecs
import errno
import hashlib
import io
import json
import logging
import math
import mmap
import os
import socket
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    TEMPLATES,
    check_conversations,
    repair_conversations,
    tokenize_conversation,
)
from errors import InputError

log = logging.getLogger("nanovt.data")

# -----------------------------------------------------------------------------
# 1. Images: LLaVA-1.5's recipe (docs/data.md §Images)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_MEAN_RGB = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): LLaVA truncates, not rounds
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~ a 9459 x 9459 image)


def to_rgb(image):
    """PIL image of any mode -> RGB. As LLaVA (`.convert("RGB")`), alpha is dropped, not composited;
    16-bit greys are scaled to 8 bits (PIL's convert would clip them at 255: a white image)."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def expand_to_square(image, background=CLIP_MEAN_RGB):
    """Centre the image on a square canvas of its longer side (LLaVA's `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h),) * 2, background)
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def process_image(image, size, pad_to_square=True, max_pixels=MAX_PIXELS):
    """PIL image -> float tensor (3, size, size): CLIPImageProcessor's steps after LLaVA's padding.
    Refuses (ImageRefused) an image whose padded square, or unpadded resize, would exceed max_pixels."""
    w, h = image.size
    if pad_to_square:
        check_square(w, h, max_pixels)
    elif size * size * max(w, h) > max_pixels * min(w, h):  # the resize below keeps the aspect ratio
        raise ImageRefused(f"decompression bomb: {w}x{h} resized to a short side of {size} is over "
                           f"{max_pixels} pixels")
    image = to_rgb(image)
    if pad_to_square:
        image = expand_to_square(image)
    w, h = image.size  # resize the shortest edge to `size` (bicubic), the long edge as HF: int()
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2  # centre crop
    x = np.asarray(image)[top:top + size, left:left + size]
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # rescale in float64 then float32, as HF
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, size, size)


class ImageRefused(InputError):
    """The image gate's refusal (open_image): the reason, e.g. "decompression bomb: ...", "not a regular
    file: ... is a FIFO". A dataset skips the sample with it; eval.py and sample.py print it."""


def check_square(w, h, max_pixels=MAX_PIXELS):
    """Pad-to-square allocates max(w, h)^2 pixels: a 20000 x 1 image, 20000 pixels decoded, would cost
    400 million (1.2 GB in RGB) once padded. Refuse it like any other decompression bomb."""
    if max(w, h) ** 2 > max_pixels:
        raise ImageRefused(f"decompression bomb: {w}x{h} pads to a {max(w, h)}x{max(w, h)} square, over "
                           f"{max_pixels} pixels")


_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _check_regular(mode, path):
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL if test(mode)), "not a plain file")
        raise ImageRefused(f"not a regular file: {path} is {kind}")


def open_regular(path):
    """A binary file object for `path` if it is a regular file (symlinks followed). A FIFO, device or
    socket is refused from its stat, never opened: opening a FIFO for reading blocks until someone
    writes, and reading /dev/zero never ends. The open itself does not block (O_NONBLOCK) and its
    fstat is checked again, in case the path was swapped between the two."""
    _check_regular(os.stat(path).st_mode, path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _check_regular(os.fstat(fd).st_mode, path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_image(source, max_pixels=MAX_PIXELS, pad_to_square=True):
    """The image gate every reader passes: training (both datasets), eval.py (files and base64),
    sample.py, and a server. `source`: a path, or the image file's bytes. Before any pixel is
    decoded it refuses (ImageRefused) a special file, and from the header an image whose width x
    height, or (pad_to_square, LLaVA's recipe) whose padded square, is over max_pixels; then it
    decodes fully, so a truncated file fails here (LOAD_TRUNCATED_IMAGES stays off), and converts to
    RGB. Other errors are PIL's and the OS's (missing, not an image, truncated). The largest buffer
    it lets through is max_pixels x 4 bytes (about 360 MB at the default)."""
    import warnings
    f = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else open_regular(source)
    with f, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a warning is a refusal here
        try:
            im = Image.open(f)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageRefused(f"decompression bomb: {e}") from None
        with im:
            w, h = im.size
            if w * h > max_pixels:  # checked from the header, before decoding
                raise ImageRefused(f"decompression bomb: {w}x{h} > {max_pixels} pixels")
            if pad_to_square:
                check_square(w, h, max_pixels)
            im.load()  # decode now
            return to_rgb(im)


def load_image(path, max_pixels=MAX_PIXELS):
    """Open, fully decode and convert an image file through the gate (open_image); raises on missing,
    special, corrupt, truncated, or too large."""
    return open_image(path, max_pixels)


def image_path(image_folder, image, allow_outside=False):
    """Where a sample's `image` field points: image_folder/image. Unless allow_outside, the path must
    stay inside image_folder once resolved (.. and symlinks followed): a JSON that names
    ../../etc/passwd, an absolute path, or a symlink leading out is refused (ImageRefused). Symlinks
    that stay inside are followed; a symlinked image_folder itself is fine (its target is the root)."""
    path = os.path.join(str(image_folder), image)
    if allow_outside:
        return path
    root = os.path.realpath(str(image_folder))
    real = os.path.realpath(path)
    if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
        raise ImageRefused(f"image outside image_folder: {image} resolves to {real}, not under {root} "
                           f"(allow_outside_images=True if the dataset means it)")
    return path


def leaves_folder(image):
    """Whether a relative image path names a place outside its folder by its text alone: absolute, or
    climbing out with .. (symlinks are resolved when the image is opened, image_path)."""
    norm = os.path.normpath(image)
    return os.path.isabs(image) or norm == ".." or norm.startswith(".." + os.sep)


# -----------------------------------------------------------------------------
# 2. Datasets, collate, sampler


def read_text_utf8(path):
    """A file's text: UTF-8, a leading byte-order mark dropped; other bytes are an error naming the
    file, the byte offset and the line."""
    raw = Path(path).read_bytes()
    skip = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        line = raw[:at].count(b"\n") + 1
        raise InputError(f"{path}: not UTF-8 text: byte 0x{raw[at]:02x} at byte offset {at} (line {line}); "
                         f"save the file as UTF-8") from None


def read_json(path):
    """A JSON list (or JSON lines if the file ends in .jsonl); errors name the file, line and column."""
    text = read_text_utf8(path)
    if not str(path).endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # one whole JSON value, then more: most likely one sample per line
                raise InputError(
                    f"{path}: a second JSON value starts at line {e.lineno}, column {e.colno}; this looks like "
                    f"JSON Lines (one sample per line): name the file .jsonl, or write one JSON list") from None
            raise InputError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: malformed JSON at line {n}, column {e.colno}: {e.msg}") from None
    return rows


def find_missing_images(image_folder, paths, workers=32):
    """The indices of `paths` (relative to image_folder) where nothing is (a broken symlink counts as
    nothing); a parallel scan. What is there but not an image file (a FIFO, a directory) is refused,
    with its reason, when it is loaded (open_image).

    os.stat releases the GIL, so threads overlap the file system's latency (a network disk, a
    cold cache); each thread checks a block of paths, so a warm local disk costs what one loop does."""
    from concurrent.futures import ThreadPoolExecutor
    folder, paths = str(image_folder), list(paths)
    block = max(1, math.ceil(len(paths) / (workers * 4)))
    blocks = [paths[i:i + block] for i in range(0, len(paths), block)]
    with ThreadPoolExecutor(max(1, min(workers, len(blocks)))) as pool:
        found = pool.map(lambda ps: [os.path.exists(os.path.join(folder, p)) for p in ps], blocks)
        found = [ok for part in found for ok in part]
    return [k for k, ok in enumerate(found) if not ok]


def missing_summary(paths, total):
    """ "N of M images missing, by folder: a/b 3, c 1" for the missing relative paths."""
    by_folder = Counter(os.path.dirname(p) or "." for p in paths)
    return (f"{len(paths)} of {total} images missing, by folder: "
            + ", ".join(f"{folder} {n}" for folder, n in sorted(by_folder.items(), key=lambda x: (-x[1], x[0]))))


def file_hash(path, block=1 << 24):
    """blake2b (16 bytes, hex) of a file's bytes, read in 16 MiB blocks: about a second per GB, less
    than parsing the JSON costs."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path, write):
    """Write a file whole or not at all: `write(f)` into a temporary file beside it (named by host
    and pid, so writers on a shared disk never collide), fsync, rename over `path`, fsync the folder."""
    path = str(path)
    tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SampleIndex:
    """Samples kept compactly: each one's JSON in one bytes buffer, found by an offsets array and
    decoded when asked for. Parsed dicts cost several times the file's size per rank (3.4x for
    mix665k-like samples: a retired script, `git show 0aedc80:bench/data_memory.py`), and DataLoader workers copy them page by page as
    reference counts change (copy-on-write); one buffer and one array do neither. Indexing and iteration give fresh dicts, so callers cannot change it."""

    _paths = None  # (blob file, offsets .npy) when memory-mapped from a read cache

    def __init__(self, samples):
        chunks = [json.dumps(s, ensure_ascii=False, separators=(",", ":")).encode("utf-8") for s in samples]
        self._offsets = np.cumsum([0] + [len(c) for c in chunks], dtype=np.int64)
        self._blob = b"".join(chunks)

    @classmethod
    def mapped(cls, blob_path, offsets_path):
        """A SampleIndex over files written by save(): both memory-mapped read-only, so processes
        that map the same files share one copy in the page cache."""
        self = cls.__new__(cls)
        self._paths = (str(blob_path), str(offsets_path))
        self._map()
        return self

    def _map(self):
        blob_path, offsets_path = self._paths
        self._offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
        with open(blob_path, "rb") as f:  # the map stays valid after the file is closed
            size = os.fstat(f.fileno()).st_size
            self._blob = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        if self._offsets.ndim != 1 or len(self._offsets) < 1 or self._offsets[-1] != size:
            raise ValueError(f"{blob_path}: {size} bytes, but {offsets_path} ends at "
                             f"{self._offsets[-1] if len(self._offsets) else None}")

    def save(self, blob_path, offsets_path):
        """Write the buffer and the offsets (a .npy of int64), each atomically."""
        write_atomic(blob_path, lambda f: f.write(self._blob))
        write_atomic(offsets_path, lambda f: np.save(f, np.asarray(self._offsets, np.int64), allow_pickle=False))

    def __getstate__(self):  # DataLoader workers started by spawn/forkserver map the files again
        return {"_paths": self._paths} if self._paths else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._paths:
            self._map()

    def __len__(self):
        return len(self._offsets) - 1

    def __getitem__(self, j):
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        j %= len(self)
        return json.loads(self._blob[self._offsets[j]:self._offsets[j + 1]])

    def __iter__(self):
        return (self[j] for j in range(len(self)))


class _SkippingDataset(torch.utils.data.Dataset):
    """Shared bad-sample handling: warn once per sample, count per reason, serve the next sample.

    Skips are keyed by the sample's position (("read", k) in the file, ("load", j) in .samples),
    so two bad samples that share an id count twice and one sample seen again counts once.
    Counting across processes: DataLoader workers are copies of this object, so what they count
    stays with them; each item carries the skips made while loading it ("skipped"), collate
    gathers them into the batch, and the training loop hands them to note_skipped() in the main
    process. Ranks combine their load-time skips with merge_load_skips(); read-time skips are the
    same on every rank (each reads the whole file) and are counted once.
    """

    max_tries = 64  # this many bad samples in a row means the data is broken: raise

    def _init_skips(self, strict):
        self.strict, self.skipped, self._counted = strict, Counter(), {}
        self.repaired, self.missing = Counter(), ""
        self.missing_paths, self.image_samples = [], 0  # the image paths found missing, of how many

    def _skip(self, key, sample_id, reason, warn=True):
        if self.strict:
            raise InputError(f"sample {sample_id}: {reason}")
        if key not in self._counted:  # count each bad sample once, however many epochs
            self._counted[key] = (sample_id, reason)
            self.skipped[reason.split(":")[0]] += 1
            if warn:
                log.warning("skipping sample %s: %s", sample_id, reason)

    def note_skipped(self, skipped):
        """Count skips reported by a batch (collate's "skipped": (index, id, reason) triples)."""
        for j, sample_id, reason in skipped:
            self._skip(("load", j), sample_id, reason, warn=False)  # the worker has warned

    def load_skips(self):
        """{index: (id, reason)} of the samples skipped while loading: what ranks exchange."""
        return {key[1]: v for key, v in self._counted.items() if key[0] == "load"}

    def merge_load_skips(self, per_rank):
        """Add other ranks' load_skips(); a sample skipped on two ranks counts once."""
        for skips in per_rank:
            for j, (sample_id, reason) in skips.items():
                self._skip(("load", j), sample_id, reason, warn=False)

    def report(self):
        total = sum(self.skipped.values())
        text = f"skipped {total} samples" + (": " + ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
                                             if total else "")
        if self.repaired:
            text += "; repaired " + ", ".join(f"{n} ({r})" for r, n in self.repaired.most_common())
        return text + (f"; {self.missing}" if self.missing else "")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        skipped = []
        for k in range(self.max_tries):
            j = (index + k) % len(self.samples)
            try:
                item = self._load(j)
                item["skipped"] = skipped  # lets the main process count skips made in workers
                return item
            except (OSError, ValueError, SyntaxError, MemoryError, Image.DecompressionBombError,
                    Image.DecompressionBombWarning) as e:  # what PIL, the image gate and our checks raise
                sid = str(self.samples[j].get("id", j))
                bomb = isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning))
                reason = (f"decompression bomb: {e}" if bomb else str(e) if isinstance(e, ValueError)
                          else f"bad image: {type(e).__name__}: {e}")
                self._skip(("load", j), sid, reason)
                skipped.append((j, sid, reason))
        raise RuntimeError(f"{self.max_tries} bad samples in a row from index {index}: {self.report()}")

    def _drop_missing_images(self, rows, where):
        """Read-time check: skip the samples in `rows` [(key, id, sample)] whose image path leaves
        image_folder (unless allow_outside) or whose image file is missing; return the others. Logs
        one summary by folder and counts what check_missing_share() judges."""
        with_image = [r for r in rows if r[2].get("image")]
        self.image_samples = len(with_image)
        outside = set() if self.allow_outside else {k for k, r in enumerate(with_image) if leaves_folder(r[2]["image"])}
        for k in sorted(outside):
            key, sid, sample = with_image[k]
            self._skip(key, sid, f"image outside image_folder: {sample['image']} (allow_outside_images=True "
                                 f"if the dataset means it)")
        scan = [k for k in range(len(with_image)) if k not in outside]
        gone = {scan[k] for k in find_missing_images(self.image_folder, [with_image[k][2]["image"] for k in scan])}
        self.missing_paths = [with_image[k][2]["image"] for k in sorted(gone)]
        if not gone and not outside:
            return rows
        if gone:
            self.missing = missing_summary(self.missing_paths, len(with_image))
            log.warning("%s: %s (under %s)", where, self.missing, self.image_folder)
        dropped = {with_image[k][0] for k in gone | outside}
        gone_keys = {with_image[k][0] for k in gone}
        for key, sid, sample in rows:
            if key in gone_keys:
                self._skip(key, sid, f"missing image file: {Path(self.image_folder) / sample['image']}",
                           warn=len(gone) <= 20)  # past that, the summary says it better than warnings
        return [r for r in rows if r[0] not in dropped]

    def check_missing_share(self, max_missing):
        """An InputError when more than `max_missing` (a share, 0-1) of the image samples have no image
        file: most likely the image folder is wrong or not mounted, and training on what is left (the
        text-only samples, say) would succeed quietly at the wrong thing. None: no check."""
        n, total = len(self.missing_paths), self.image_samples
        if max_missing is None or not total or n <= max_missing * total:
            return
        raise InputError(f"{n} of {total} image samples have no image file under {os.path.abspath(self.image_folder)} "
                         f"(more than {max_missing:.0%}): is image_folder right, is its disk mounted? To train on "
                         f"the rest anyway, set max_missing_images=1.0")

    def _pixels(self, image_file):
        path = image_path(self.image_folder, image_file, self.allow_outside)
        if not os.path.exists(path):
            raise ValueError(f"missing image file: {path}")
        return process_image(open_image(path, self.max_pixels), self.image_size)


class LlavaDataset(_SkippingDataset):
    """LLaVA JSON conversations (stage I with template "plain", II and IV with a chat template).

    Items: {"input_ids": (T,) long, "labels": (T,) long, "pixel_values": (3, H, W) float or None,
    "id": str}. Image paths are relative to `image_folder` (default: the JSON's directory) and stay
    inside it unless allow_outside (image_path). JSON and text checks run at init; images are read
    lazily. max_missing: the largest share of image samples that may lack their file (None: any).
    """

    def __init__(self, json_path, image_folder, tokenizer, template, image_size, num_patches,
                 image_token_id=IMAGE_TOKEN_ID, max_len=2048, strict=False, max_pixels=MAX_PIXELS,
                 cache_dir=None, write_cache=True, allow_outside=False, max_missing=None):
        assert template in TEMPLATES, f"unknown template {template!r}"
        self._init_skips(strict)
        self.image_folder = image_folder if image_folder is not None else Path(json_path).parent
        self.tokenizer, self.template, self.image_size = tokenizer, template, image_size
        self.num_patches, self.image_token_id = num_patches, image_token_id
        self.max_len, self.max_pixels, self.allow_outside = max_len, max_pixels, allow_outside
        # cache_dir: keep what the read found there (data.ReadCache), or take it from there; with
        # write_cache=False a missing cache is read here but not written (another process writes it)
        self.from_cache = False
        cache = ReadCache(cache_dir, self._cache_key(json_path)) if cache_dir is not None else None
        if cache and cache.load(self):
            log.info("%s: taken from the read cache %s (%s)", json_path, cache.folder / cache.stem, self.report())
            if self.missing:  # said where it shows: a list from an earlier run must not pass unnoticed
                log.warning("%s: %s (under %s), as recorded in the read cache %s and checked again now",
                            json_path, self.missing, self.image_folder, cache.folder / cache.stem)
        else:
            if cache and not write_cache:
                log.warning("%s: no valid read cache in %s (the node's first process writes it); reading the file "
                            "here", json_path, cache_dir)
            self._read(json_path)
            if cache and write_cache:
                cache.save(self)
                if not cache.load(self):  # serve from the files, as the other processes do
                    raise RuntimeError(f"{cache_dir}: the read cache just written does not load")
        self.check_missing_share(max_missing)

    def _cache_key(self, json_path):
        """What the read-time result depends on: the file (path, size, mtime and a hash of its bytes:
        an edit that keeps size and mtime, as `cp -p` or `rsync -t` can, is still seen), the image
        folder (scanned for missing files), allow_outside, num_patches (lengths) and strict. Not the
        template, the tokenizer or max_len: they only act when an item is loaded."""
        st = os.stat(json_path)
        return {"version": ReadCache.version, "kind": "llava", "source": str(Path(json_path).resolve()),
                "size": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b": file_hash(json_path),
                "image_folder": str(Path(self.image_folder).resolve()), "allow_outside": self.allow_outside,
                "num_patches": self.num_patches, "strict": self.strict}

    def _read(self, json_path):
        """Read, repair and check the file, scan the image paths; keep the usable samples."""
        log.info("%s: reading and checking the JSON", json_path)
        num_patches = self.num_patches
        data = read_json(json_path)
        if not isinstance(data, list):
            raise InputError(f"{json_path}: expected a JSON list of samples, got {type(data).__name__}")
        rows = []  # (key, id, sample) of the samples that pass the text checks
        for k, sample in enumerate(data):
            sid = str(sample.get("id", k)) if isinstance(sample, dict) else str(k)
            sample, repairs = repair_conversations(sample)
            reason = check_conversations(sample)
            if reason:
                self._skip(("read", k), sid, reason)
                continue
            for r in repairs:
                self.repaired[r] += 1
            rows.append((("read", k), sid, sample))
        if self.repaired:
            log.info("%s: repaired as LLaVA does: %s", json_path, dict(self.repaired))
        # missing images are found now, so the sampler only ever serves usable samples
        samples = [sample for _, _, sample in self._drop_missing_images(rows, json_path)]
        del data, rows
        # estimated lengths (words + patches), negative for text-only samples, as LLaVA's
        words = [sum(len(t["value"].split()) for t in s["conversations"]) for s in samples]
        self.modality_lengths = array.array("i", [w + num_patches if s.get("image") else -w
                                                  for w, s in zip(words, samples)])
        self.lengths = array.array("i", [abs(n) for n in self.modality_lengths])
        self.samples = SampleIndex(samples)
        if not self.samples:
            raise InputError(f"{json_path}: no usable samples ({self.report()})")

    def _load(self, j):
        sample = self.samples[j]
        has_image = bool(sample.get("image"))
        ids, labels = tokenize_conversation(sample["conversations"], self.tokenizer, self.template,
                                            self.image_token_id, self.num_patches, has_image)
        if len(ids) > self.max_len:  # truncate the tail, never through the image block
            if has_image and max(k for k, i in enumerate(ids) if i == self.image_token_id) >= self.max_len:
                raise ValueError(f"too long: image block ends beyond max_len={self.max_len}")
            ids, labels = ids[:self.max_len], labels[:self.max_len]
        if all(l == IGNORE_INDEX for l in labels[1:]):
            raise ValueError(f"too long: no answer left within max_len={self.max_len}")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "id": str(sample.get("id", j)),
                "pixel_values": self._pixels(sample["image"]) if has_image else None}


class ReadCache:
    """What LlavaDataset's init found in a file, kept so that one process per node reads the JSON
    and the others map the result (train.py's build_dataset): in `folder`, files named by a hash
    of the key (LlavaDataset._cache_key):
      <stem>.blob          the usable samples' JSON, one buffer (SampleIndex)
      <stem>.offsets.npy   int64, where each sample starts in the buffer (and the end)
      <stem>.lengths.npy   int32, the modality lengths (negative: text only)
      <stem>.json          the key, counts, and the read-time report (skips by reason, each
                           skipped sample's position, id and reason, repairs, missing images);
                           written last, so its presence means the others are complete
    Every file is written atomically. A key that differs (another file, size, mtime or content,
    another image folder, num_patches or strict) is a miss: the file is read again and the cache
    rewritten. Plain binary, .npy and JSON only: nothing here is unpickled. The images recorded
    missing are checked again on every load (a parallel stat each): if any is back (a folder
    mounted, images restored), the cache is a miss and the file is read again. Images removed after
    the cache was written are caught when their item is loaded, and skipped as usual. train.py's
    --overwrite deletes the folder with the run's other files.
    """

    version = 2

    def __init__(self, folder, key):
        self.folder, self.key = Path(folder), key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.stem = f"{key['kind']}-{digest}"

    def _path(self, suffix):
        return self.folder / f"{self.stem}{suffix}"

    def save(self, ds):
        """Write the dataset's read-time result; other caches in the folder (stale keys) are removed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ds.samples.save(self._path(".blob"), self._path(".offsets.npy"))
        write_atomic(self._path(".lengths.npy"),
                     lambda f: np.save(f, np.asarray(ds.modality_lengths, np.int32), allow_pickle=False))
        read_skips = [[key[1], sid, reason] for key, (sid, reason) in ds._counted.items() if key[0] == "read"]
        meta = {"key": self.key, "samples": len(ds.samples), "skipped": dict(ds.skipped),
                "read_skips": read_skips, "repaired": dict(ds.repaired), "missing": ds.missing,
                "missing_paths": ds.missing_paths, "image_samples": ds.image_samples}
        write_atomic(self._path(".json"), lambda f: f.write(json.dumps(meta, ensure_ascii=False).encode("utf-8")))
        for other in self.folder.iterdir():  # stale caches of this kind: another key
            if other.name.startswith(f"{self.key['kind']}-") and not other.name.startswith(self.stem):
                other.unlink(missing_ok=True)

    def load(self, ds):
        """Fill the dataset's read-time state from the cache; False if there is none for this key
        (or it is inconsistent: then it is rebuilt)."""
        try:
            meta = json.loads(self._path(".json").read_text(encoding="utf-8"))
            if meta.get("key") != self.key:
                return False
            samples = SampleIndex.mapped(self._path(".blob"), self._path(".offsets.npy"))
            lengths = np.load(self._path(".lengths.npy"), allow_pickle=False)
        except (OSError, ValueError) as e:
            if not isinstance(e, FileNotFoundError):
                log.warning("%s: read cache %s unusable (%s); reading the file again", self.folder, self.stem, e)
            return False
        if len(samples) != meta["samples"] or lengths.shape != (meta["samples"],) or lengths.dtype != np.int32:
            log.warning("%s: read cache %s is inconsistent; reading the file again", self.folder, self.stem)
            return False
        recorded = meta["missing_paths"]
        back = len(recorded) - len(find_missing_images(self.key["image_folder"], recorded))
        if back:
            log.warning("%s: %d of the %d images the read cache %s recorded missing are there now; reading "
                        "the file again", self.key["image_folder"], back, len(recorded), self.stem)
            return False
        ds.samples = samples
        ds.modality_lengths = array.array("i", lengths.tobytes())
        ds.lengths = array.array("i", [abs(n) for n in ds.modality_lengths])
        ds.skipped, ds.repaired, ds.missing = Counter(meta["skipped"]), Counter(meta["repaired"]), meta["missing"]
        ds.missing_paths, ds.image_samples = recorded, meta["image_samples"]
        ds._counted = {("read", k): (sid, reason) for k, sid, reason in meta["read_skips"]}
        ds.from_cache = True
        return True


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageOnlyDataset(_SkippingDataset):
    """Stage III data: BOS + num_patches image placeholders, no text, every label ignored.

    `source`: a folder of images (searched recursively, sorted) or a LLaVA JSON whose samples'
    images are used (relative to `image_folder`, default the JSON's directory).
    """

    def __init__(self, source, tokenizer, image_size, num_patches, image_token_id=IMAGE_TOKEN_ID,
                 image_folder=None, strict=False, max_pixels=MAX_PIXELS, allow_outside=False, max_missing=None):
        self._init_skips(strict)
        self.tokenizer, self.image_size, self.num_patches = tokenizer, image_size, num_patches
        self.image_token_id, self.max_pixels, self.allow_outside = image_token_id, max_pixels, allow_outside
        source = Path(source)
        if source.is_dir():
            self.image_folder = source
            files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self.samples = [{"id": str(p.relative_to(source)), "image": str(p.relative_to(source))} for p in files]
        else:
            self.image_folder = image_folder if image_folder is not None else source.parent
            data = read_json(source)
            if not isinstance(data, list):
                raise InputError(f"{source}: expected a JSON list of samples, got {type(data).__name__}")
            rows = []
            for k, s in enumerate(data):
                if not isinstance(s, dict) or not s.get("image"):
                    continue
                sid = str(s.get("id", k))
                if not isinstance(s["image"], str):
                    self._skip(("read", k), sid, f"image field is not a string ({type(s['image']).__name__}; "
                                                 f"one image path per sample)")
                    continue
                rows.append((("read", k), sid, {"id": sid, "image": s["image"]}))
            self.samples = SampleIndex(s for _, _, s in self._drop_missing_images(rows, source))
            self.check_missing_share(max_missing)
        if not self.samples:
            raise InputError(f"{source}: no images")
        self.modality_lengths = self.lengths = [num_patches + 1] * len(self.samples)

    def _load(self, j):
        ids, sample = [self.tokenizer.bos_id] + [self.image_token_id] * self.num_patches, self.samples[j]
        return {"input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), IGNORE_INDEX),
                "pixel_values": self._pixels(sample["image"]), "id": sample["id"]}


def collate(samples, pad_id):
    """Right-pad a list of items into a batch. Samples that are None are dropped.

    Returns input_ids (B, T), labels (B, T) with IGNORE_INDEX on padding, attention_mask (B, T)
    bool, pixel_values (N_img, 3, H, W) for the samples with an image in batch order (or None),
    ids, and skipped: the (id, reason) of bad samples replaced while loading this batch.
    """
    samples = [s for s in samples if s is not None]
    T = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), T), dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[b, :n], labels[b, :n], attention_mask[b, :n] = s["input_ids"], s["labels"], True
    images = [s["pixel_values"] for s in samples if s.get("pixel_values") is not None]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.stack(images) if images else None, "ids": [s["id"] for s in samples],
            "skipped": [x for s in samples for x in s.get("skipped", [])]}


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Indices for one rank: shuffled from (seed, epoch), sharded, optionally grouped by length.

    Like LLaVA's `group_by_modality_length`: image and text-only samples are shuffled apart, cut
    into megabatches of batch_size * world_size, each sorted by length (longest first) so that a
    micro-batch holds similar lengths, and the megabatches are shuffled together. Each megabatch is
    dealt to the ranks so that their total lengths come out even (LLaVA's `split_to_even_chunks`:
    longest first, each to the rank with the least length so far that still has room); without
    grouping, megabatch k gives rank r its r-th equal slice. The index list is padded by repeating its start to a
    multiple of world_size (as DistributedSampler), so all ranks see the same number of samples.
    `skip` drops the first samples of this rank's epoch (resume mid-epoch).
    """

    def __init__(self, lengths, batch_size, seed=0, epoch=0, rank=0, world_size=1, group_by_length=True, skip=0):
        assert 0 <= rank < world_size
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, epoch
        self.rank, self.world_size, self.group_by_length, self.skip = rank, world_size, group_by_length, skip
        self.num_samples = math.ceil(len(self.lengths) / world_size)  # per rank

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def indices(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # same on every rank
        n, mega = len(self.lengths), self.batch_size * self.world_size
        perm = torch.randperm(n, generator=g).tolist()
        perm += (perm * math.ceil(self.num_samples * self.world_size / n))[:self.num_samples * self.world_size - n]
        if not self.group_by_length:
            megabatches = [perm[i:i + mega] for i in range(0, len(perm), mega)]
        else:
            groups = [[i for i in perm if self.lengths[i] > 0], [i for i in perm if self.lengths[i] <= 0]]
            megabatches, leftover = [], []
            for group in groups:
                cut = len(group) - len(group) % mega
                megabatches += [group[i:i + mega] for i in range(0, cut, mega)]
                leftover += group[cut:]
            order = torch.randperm(len(megabatches), generator=g).tolist()
            megabatches = [megabatches[k] for k in order] + ([leftover] if leftover else [])
            megabatches = [sorted(m, key=lambda i: -abs(self.lengths[i])) for m in megabatches]
        out = []
        for m in megabatches:  # every megabatch size is a multiple of world_size
            if self.group_by_length:
                out += split_even(m, self.lengths, self.world_size)[self.rank]
            else:
                share = len(m) // self.world_size
                out += m[self.rank * share:(self.rank + 1) * share]
        return out

    def __iter__(self):
        return iter(self.indices()[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


def split_even(indices, lengths, world_size):
    """Deal `indices` (longest first) to world_size equal-count parts of about equal total length:
    each goes to the part with the least total so far that still has room (ties: the lowest part)."""
    share = len(indices) // world_size
    parts, totals = [[] for _ in range(world_size)], [0] * world_size
    for i in indices:
        r = min((r for r in range(world_size) if len(parts[r]) < share), key=lambda r: totals[r])
        parts[r].append(i)
        totals[r] += abs(lengths[i])
    return parts


def make_sampler(dataset, batch_size, seed=0, epoch=0, rank=0, world_size=1, group_by_length=True, skip=0):
    """A LengthGroupedSampler over `dataset.modality_lengths` (all equal if it has none)."""
    lengths = getattr(dataset, "modality_lengths", None) or [1] * len(dataset)
    return LengthGroupedSampler(lengths, batch_size, seed, epoch, rank, world_size, group_by_length, skip)
