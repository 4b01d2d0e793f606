"""
Checkpoints of a training run (docs/checkpoints.md): what train.py saves, how it resumes, and who
owns an out_dir. Kept out of the training loop, which only calls the functions here.

- Step checkpoints (`out_dir/step-N/`) are written with torch.distributed.checkpoint (DCP): every
  rank writes and reads only its own shard of the model and of the AdamW state, in parallel,
  optionally in the background (`async_save`). Beside them: every rank's RNG state (as tensors),
  and `meta.json` (step, data position, run id, the run's fingerprint), written last. A checkpoint
  is published by renaming `step-N.tmp` once every file is fsynced, so a crash at any moment
  leaves the previous complete checkpoint as it was.
- `final/` is model-only: one consolidated model.safetensors in the export dtype, config.json and
  the tokenizer, gathered tensor by tensor and streamed to disk by rank 0. It is what the next
  stage's init_from, sample.py and eval.py read (model.VTLMM.from_pretrained).
- Nothing is unpickled: DCP's own `.metadata` file is a pickle, so it is read with an unpickler
  that constructs only DCP's metadata classes; the tensors are read by DCP with
  torch.load(weights_only=True); a checkpoint that declares a non-tensor entry (which stock DCP
  would read with a full torch.load) is refused. The rest is JSON.
- A run owns its out_dir: a lock file (pid, host), a run id in every checkpoint, and pruning that
  only removes this run's own older checkpoints.
"""

import contextlib
import errno
import io
import json
import os
import pickle
import random
import secrets
import shutil
import socket
import struct
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from errors import DiskFull, InputError, InputExistsError, InputKeyError, InputRuntimeError, find_errno

LOCK = "train.lock"
META = "meta.json"            # a step checkpoint's own file, written after all of DCP's files
FINAL_META = "train_meta.json"  # final/: which run and step wrote it
OTHER_HOST_STALE_S = 3600     # a lock from another host counts as stale when untouched this long


def _dist():
    return dist.is_available() and dist.is_initialized()


warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _rank():
    return dist.get_rank() if _dist() else 0


def _world():
    return dist.get_world_size() if _dist() else 1


# ----------------------------------------------------------------------------------------------
# small helpers: durable files, rank-0 decisions that every rank learns


def fsync_path(path):
    """fsync a file or a directory (the directory entry of a rename lives in its parent)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path, obj):
    """Write JSON durably: into path.tmp, fsync, rename."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _broadcast_text(text):
    """Rank 0's string on every rank (as a uint8 tensor: nothing pickled between ranks either)."""
    if not _dist() or _world() == 1:
        return text
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    raw = (text or "").encode() if _rank() == 0 else b""
    n = torch.tensor([len(raw)], dtype=torch.int64, device=dev)
    dist.broadcast(n, 0)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
    if _rank() == 0 and raw:
        buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return bytes(buf.cpu().tolist()).decode()


def on_rank0(fn):
    """Run fn() on rank 0 only; every rank returns its JSON result or raises its error.
    (Rank 0 alone touches the file system; the others wait for one small broadcast.)"""
    msg = ""
    if _rank() == 0:
        try:
            msg = json.dumps({"ok": fn()})
        except Exception as e:  # every rank must learn it, or the others hang in the next collective
            if not _dist() or _world() == 1:
                raise
            msg = json.dumps({"error": f"{type(e).__name__}: {e}"})
            _broadcast_text(msg)
            raise
    res = json.loads(_broadcast_text(msg))
    if "error" in res:
        raise RuntimeError(f"rank 0: {res['error']}")
    return res["ok"]


def all_ok(flag):
    """True on every rank when flag is True on every rank."""
    if not _dist() or _world() == 1:
        return bool(flag)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def wait_for(path, timeout_s, what):
    """Poll until path exists (instead of a barrier behind another rank's file I/O)."""
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {path} ({what}); did rank 0 fail?")
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# who owns an out_dir: the lock and the run id


def new_run_id():
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lock:
    """out_dir/train.lock: {pid, host, started}. Created with O_EXCL; a lock whose process is gone
    (same host, dead pid, or another host's lock untouched for an hour) is stale and taken over."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, LOCK)
        self.held = False

    def acquire(self):
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._stale()
                continue  # stale and removed, or gone in between (a live lock raised): try again
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise RuntimeError(f"could not take the lock {self.path}")

    def _stale(self):
        """None if the lock is gone; True after removing a stale lock; raises if it is live."""
        try:
            with open(self.path) as f:
                other = json.load(f)
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, ValueError):
            other, age = {}, time.time() - os.path.getmtime(self.path)
        host, pid = other.get("host"), other.get("pid")
        if host == socket.gethostname() and isinstance(pid, int):
            # our own pid: an earlier stage in this very process that raised (one stage at a time)
            live = pid != os.getpid() and _pid_alive(pid)
        else:
            live = age < OTHER_HOST_STALE_S
        if live:
            raise InputRuntimeError(
                f"{os.path.dirname(self.path)} is in use by another run (lock {self.path}: pid {pid} on {host}, "
                f"started {other.get('started')}). Two runs must not share an out_dir; if that job is dead, "
                f"delete the lock file.")
        print(f"note: taking over the stale lock {self.path} (pid {pid} on {host} is gone)")
        os.remove(self.path)
        return True

    def touch(self):
        if self.held:
            os.utime(self.path)

    def release(self):
        if self.held:
            self.held = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass


def _step_dirs(out_dir):
    """(step, name) of every step-N entry, complete or not, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for n in os.listdir(out_dir):
        if n.startswith("step-"):
            num = n[5:].split(".")[0]
            if num.isdigit():
                found.append((int(num), n))
    return sorted(found)


def complete_checkpoints(out_dir):
    """Published step checkpoints (step-N/ with its meta.json), newest first, as (path, meta)."""
    out = []
    for step, name in reversed(_step_dirs(out_dir)):
        path = os.path.join(out_dir, name)
        if name != f"step-{step}" or not os.path.isfile(os.path.join(path, META)):
            continue
        try:
            meta = read_json(os.path.join(path, META))
        except (ValueError, OSError):
            continue
        if meta.get("complete") is True:
            out.append((path, meta))
    return out


def latest(out_dir):
    """The newest published step checkpoint, or None."""
    c = complete_checkpoints(out_dir)
    return c[0][0] if c else None


def is_final(path):
    """A published final/ (it appears whole, by a rename; older runs' final/ has no train_meta.json)."""
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "model.safetensors"))


OWN_FILES = ("final", "final.tmp", "metrics.jsonl", "train_config.json", "data_report.json",
             "data_cache")  # data_cache: --overwrite reads the data afresh (data.ReadCache)


def claim_out_dir(out_dir, resume=False, overwrite=False):
    """Rank 0 takes the out_dir's lock and checks that the run may write there; every rank gets
    (lock or None, run id). A non-empty out_dir needs --resume (continue it) or --overwrite
    (delete its checkpoints and final/ and start over); otherwise nothing in it is touched."""
    lock = Lock(out_dir) if _rank() == 0 else None

    def check():
        os.makedirs(out_dir, exist_ok=True)
        lock.acquire()
        try:
            here = sorted(n for n in os.listdir(out_dir) if n != LOCK)
            if here and not resume:
                if not overwrite:
                    raise InputExistsError(
                        f"{out_dir} is not empty ({', '.join(here[:6])}{' ...' if len(here) > 6 else ''}). "
                        f"Pass --resume to continue the run there, or --overwrite to delete its checkpoints and "
                        f"start over, or choose another out_dir.")
                for n in here:
                    if n in OWN_FILES or n.startswith("step-"):
                        p = os.path.join(out_dir, n)
                        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
                print(f"--overwrite: removed the earlier run's checkpoints and final/ from {out_dir}")
        except BaseException:
            lock.release()
            raise
        return new_run_id()

    return lock, on_rank0(check)


# ----------------------------------------------------------------------------------------------
# the state of one rank, as a flat dict of tensors


def _rng_rows():
    """This rank's RNG states as flat tensors (torch, python, numpy, cuda): no Python objects."""
    v, state, gauss = random.getstate()
    py = torch.tensor([v, *state], dtype=torch.int64)
    py_g = torch.tensor([0.0 if gauss is None else 1.0, gauss or 0.0], dtype=torch.float64)
    kind, keys, pos, has_g, cached = np.random.get_state()
    assert kind == "MT19937"
    npk = torch.tensor([*keys.astype(np.int64).tolist(), pos, has_g], dtype=torch.int64)
    np_g = torch.tensor([cached], dtype=torch.float64)
    rows = {"torch": torch.get_rng_state(), "python": py, "python_gauss": py_g, "numpy": npk, "numpy_gauss": np_g}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rows["cuda"] = torch.cuda.get_rng_state()
    return rows


def _gather_rows(rows):
    """{name: (world, n)} with every rank's row: the same tensor on every rank (rank 0 writes it)."""
    out = {}
    for k, t in rows.items():
        if _dist() and _world() > 1:
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
            parts = [torch.empty_like(t, device=dev) for _ in range(_world())]
            dist.all_gather(parts, t.to(dev))
            out[k] = torch.stack([p.cpu() for p in parts])
        else:
            out[k] = t.unsqueeze(0).clone()
    return out


def _set_rng(rows, rank):
    """Restore this rank's row of the saved RNG states."""
    w = rows["torch"].shape[0]
    if rank >= w:
        print(f"note: rank {rank} has no saved RNG state (the checkpoint was written by {w} processes); "
              f"it keeps its seeded state")
        return
    torch.set_rng_state(rows["torch"][rank].clone())
    py = rows["python"][rank].tolist()
    g = rows["python_gauss"][rank].tolist()
    random.setstate((py[0], tuple(py[1:]), g[1] if g[0] else None))
    npk = rows["numpy"][rank].tolist()
    np.random.set_state(("MT19937", np.array(npk[:624], dtype=np.uint32), npk[624], npk[625],
                         rows["numpy_gauss"][rank].item()))
    if "cuda" in rows and torch.cuda.is_available():
        torch.cuda.set_rng_state(rows["cuda"][rank].clone())


def train_state(model, optimizer):
    """This rank's shards, flat: model/<fqn>, optim/<fqn>/<moment>; no full (gathered) copies.
    The optimizer's param_groups (hyperparameters, set from the config) are not stored."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    sd = {f"model/{k}": v for k, v in get_model_state_dict(model).items()}
    osd = get_optimizer_state_dict(model, optimizer)  # initialises AdamW's state if it has none yet
    for fqn, st in osd["state"].items():
        for name, v in st.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer state {fqn}/{name} is a {type(v).__name__}, not a tensor")
            sd[f"optim/{fqn}/{name}"] = v
    return sd, osd


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def finite(sd):
    """True on every rank when every floating tensor of every rank's shard is finite."""
    ok = all(bool(torch.isfinite(_local(v)).all()) for k, v in sd.items()
             if not k.startswith("rng/") and torch.is_floating_point(v))
    return all_ok(ok)


# ----------------------------------------------------------------------------------------------
# reading DCP's metadata without a full unpickle


_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in
    ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
     "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib._local", "PosixPath"),
     ("pathlib._local", "WindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only DCP's metadata dataclasses, torch.Size, dtypes and layouts; any other global
    (a function to call, BytesStorageMetadata for a pickled object) is refused."""

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout)):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return super().find_class(module, name)  # looks a layout name up among torch's layouts
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path):
    """A step checkpoint's DCP metadata, read safely; raises ValueError naming the file."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
    mpath = os.path.join(path, ".metadata")
    try:
        with open(mpath, "rb") as f:
            md = _MetadataUnpickler(io.BytesIO(f.read())).load()
    except FileNotFoundError:
        raise ValueError(f"{mpath} is missing") from None
    except Exception as e:
        raise ValueError(f"{mpath} cannot be read safely: {e}") from None
    if not isinstance(md, Metadata):
        raise ValueError(f"{mpath} holds a {type(md).__name__}, not DCP metadata")
    for k, v in md.state_dict_metadata.items():
        if not isinstance(v, TensorStorageMetadata):
            raise ValueError(f"{mpath}: entry {k!r} is not a tensor ({type(v).__name__}); refused")
    return md


def check_files(path, md):
    """Every byte range the metadata names exists: a truncated or missing shard is named."""
    sizes = {}
    for info in (md.storage_data or {}).values():
        rel = info.relative_path
        if os.path.isabs(rel) or ".." in rel.split("/") or "/" in rel:
            raise ValueError(f"{path}/.metadata names the file {rel!r}, outside the checkpoint")
        if info.transform_descriptors:
            raise ValueError(f"{path}/.metadata: {rel} uses transforms {info.transform_descriptors}; refused")
        f = os.path.join(path, rel)
        if f not in sizes:
            sizes[f] = os.path.getsize(f) if os.path.exists(f) else -1
        if sizes[f] < 0:
            raise ValueError(f"{f} is missing")
        if sizes[f] < info.offset + info.length:
            raise ValueError(f"{f} is truncated ({sizes[f]} bytes, needs {info.offset + info.length})")


def _safe_reader_and_planner(path):
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *a, **k):
            md = read_metadata(path)
            from torch.distributed.checkpoint.metadata import StorageMeta
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):  # stock DCP: a full torch.load of the bytes
            raise ValueError(f"{path}: {read_item.dest_index.fqn} is stored as a pickled object; refused")

    return SafeReader(path), TensorsOnlyPlanner(allow_partial_load=False)


# ----------------------------------------------------------------------------------------------
# the run's fingerprint: what must match on --resume


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def fingerprint_diff(saved, now):
    """Names (with both values) of the fingerprint fields that differ."""
    a, b = _flat(json.loads(json.dumps(saved, default=str))), _flat(json.loads(json.dumps(now, default=str)))
    return [f"{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------------------------
# step checkpoints


_ASYNC_GROUP = {}


def _async_group():
    """The background writer's collectives run in their own gloo group, apart from training's: one
    per process group, made once (every rank calls this at the same point) and destroyed with it."""
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _ASYNC_GROUP:
        _ASYNC_GROUP.clear()
        _ASYNC_GROUP[key] = dist.new_group(backend="gloo")
    return _ASYNC_GROUP[key]


def disk_full(e, path, low=64 << 20):
    """Whether the failed write `e` under `path` ran out of space: an ENOSPC or EDQUOT in its chain, or
    (torch's own writers report a short write as "unexpected pos 704 vs 598") under `low` bytes still
    free there. Asked before the partial files are removed."""
    if find_errno(e, {errno.ENOSPC, errno.EDQUOT}):
        return True
    try:
        return shutil.disk_usage(path).free < low
    except OSError:
        return False


@contextlib.contextmanager
def removed_on_failure(tmp, what):
    """Around a save into the directory `tmp`: if it fails, rank 0 removes `tmp` (resume never reads
    it, but it holds disk space), and a full disk becomes one DiskFull line that names the place."""
    try:
        yield
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        where = os.path.dirname(os.path.abspath(tmp))
        full = not isinstance(e, (KeyboardInterrupt, SystemExit)) and disk_full(e, where)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise DiskFull(f"no space left on {where} while writing {what}; removed the unfinished {tmp} (free "
                           f"some space, then --resume)") from e
        raise


class Checkpointer:
    """Saves step checkpoints of one run into out_dir/step-N/ and prunes the run's older ones."""

    def __init__(self, out_dir, run_id, keep=2, async_save=False, lock=None):
        self.out_dir, self.run_id, self.keep, self.async_save, self.lock = out_dir, run_id, keep, async_save, lock
        self.pending = None  # (future, step, tmp, meta) of a background save
        self.touched = time.monotonic()
        self.pg = _async_group() if async_save and _dist() else None

    def save(self, step, model, optimizer, meta):
        """Write step-N (every rank its shard). Refuses (FloatingPointError) a non-finite state."""
        import torch.distributed.checkpoint as dcp
        self.wait()
        tmp = os.path.join(self.out_dir, f"step-{step}.tmp")
        if _rank() == 0:  # before the collectives below: no rank writes into it before this is done
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed attempt's leftovers
            os.makedirs(tmp, exist_ok=True)
        sd, _ = train_state(model, optimizer)
        if not finite(sd):
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise FloatingPointError(f"the model or optimizer state is not finite at step {step}; not saved. "
                                     f"The last good checkpoint is {latest(self.out_dir)}")
        sd.update({f"rng/{k}": v for k, v in _gather_rows(_rng_rows()).items()})
        writer = dcp.FileSystemWriter(tmp, sync_files=True)
        meta = {**meta, "step": step, "run_id": self.run_id, "world": _world()}
        with removed_on_failure(tmp, f"the checkpoint of step {step}"):
            if self.async_save:
                # DCP stages (copies) the state into host memory before async_save returns; the steps
                # that follow do not change what is written (tests/test_checkpoint.py kills it mid-write)
                fut = dcp.async_save(sd, storage_writer=writer, process_group=self.pg, no_dist=not _dist())
                self.pending = (fut, step, tmp, meta)
            else:
                dcp.save(sd, storage_writer=writer, no_dist=not _dist())
                self._publish(step, tmp, meta)

    def poll(self):
        """Publish a finished background save (call once per step; never blocks); keep the lock
        fresh (its age tells runs on other hosts whether this one is alive)."""
        if self.lock and time.monotonic() - self.touched > 60:
            self.lock.touch()
            self.touched = time.monotonic()
        if self.pending and getattr(self.pending[0], "upload_completion", self.pending[0]).done():
            self.wait()

    def wait(self):
        """Finish the background save, if any, and publish it."""
        if self.pending:
            fut, step, tmp, meta = self.pending
            self.pending = None
            with removed_on_failure(tmp, f"the checkpoint of step {step}"):
                getattr(fut, "upload_completion", fut).result()
                self._publish(step, tmp, meta)

    def _publish(self, step, tmp, meta):
        """Rank 0: meta.json last, fsync, rename step-N.tmp -> step-N, fsync out_dir, prune.
        The other ranks do not wait for it: their shards are already on disk."""
        if _rank() != 0:
            return
        for n in os.listdir(tmp):
            fsync_path(os.path.join(tmp, n))  # the shards are fsynced by their writers; this is cheap
        write_json(os.path.join(tmp, META), {**meta, "complete": True})
        fsync_path(tmp)
        path = os.path.join(self.out_dir, f"step-{step}")
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_path(self.out_dir)
        if self.lock:
            self.lock.touch()
        self.prune(step)

    def prune(self, newest):
        """Remove this run's own published checkpoints older than the `keep` newest, and its
        unfinished step-N.tmp directories below the newest. Other runs' files are never touched."""
        mine = [(p, m) for p, m in complete_checkpoints(self.out_dir) if m.get("run_id") == self.run_id]
        if self.keep > 0:
            for p, m in mine[self.keep:]:
                if m["step"] < newest:
                    shutil.rmtree(p, ignore_errors=True)
        for step, name in _step_dirs(self.out_dir):
            if name == f"step-{step}.tmp" and step < newest:
                shutil.rmtree(os.path.join(self.out_dir, name), ignore_errors=True)

    def close(self):
        self.wait()


def _expected(sd):
    """{key: (global shape, dtype)} of a state dict of (D)Tensors."""
    return {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def _check_against(path, md, want):
    """Strict: the same keys, shapes and dtypes as this model and optimizer; names what differs."""
    have = {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if not k.startswith("rng/")}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        raise InputKeyError(f"{path}: the checkpoint does not match this model and optimizer: missing "
                       f"{len(missing)} key(s) {missing[:5]}, unexpected {len(extra)} key(s) {extra[:5]}")
    bad = [f"{k}: checkpoint {have[k][0]} {have[k][1]}, model {want[k][0]} {want[k][1]}"
           for k in sorted(want) if have[k] != want[k]]
    if bad:
        raise InputError(f"{path}: shape or dtype mismatch for {len(bad)} tensor(s): {bad[:5]}")


def resume(out_dir, model, optimizer, fingerprint, allow_changes=False):
    """Load the newest step checkpoint that reads back completely into model and optimizer (each
    rank its own shard) and restore every rank's RNG; falls back past a torn one, naming it.
    Returns (path, meta) or None. Raises when the run's fingerprint differs (unless allow_changes)
    and when keys or shapes differ (always)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    found = complete_checkpoints(out_dir)
    if not found:
        return None
    # (this builds AdamW's state with a zero-lr step when it has none: only when there is a
    # checkpoint to overwrite it, or a fresh run's first update would differ)
    sd, osd = train_state(model, optimizer)
    want = _expected(sd)
    for path, meta in found:
        # every rank checks the files (cheap: metadata and sizes); all must agree before loading
        err = ""
        try:
            md = read_metadata(path)
            check_files(path, md)
        except (ValueError, OSError) as e:
            err = str(e)
        if not all_ok(not err):
            if _rank() == 0:
                print(f"warning: {path} does not read back completely ({err or 'on another rank'}); "
                      f"trying an older checkpoint")
            continue
        diff = fingerprint_diff(meta.get("fingerprint", {}), fingerprint)
        if diff and not allow_changes:
            raise InputError(f"--resume: {path} was written by a run with other settings: {'; '.join(diff)}. "
                             f"Resume with the same settings, or pass --allow_resume_changes to change them "
                             f"deliberately (model shapes must still match).")
        if diff and _rank() == 0:
            print(f"note: resuming {path} with changed settings (--allow_resume_changes): {'; '.join(diff)}")
        _check_against(path, md, want)
        rng = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
               for k, v in md.state_dict_metadata.items() if k.startswith("rng/")}
        state = {**sd, **rng}
        reader, planner = _safe_reader_and_planner(path)
        try:
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=not _dist())
        except Exception as e:
            if _rank() == 0:
                print(f"warning: {path} does not read back completely ({str(e)[:400]}); trying an older checkpoint")
            continue
        for fqn, st in osd["state"].items():
            for name in st:
                st[name] = state[f"optim/{fqn}/{name}"]
        from torch.distributed.checkpoint.state_dict import set_model_state_dict
        set_model_state_dict(model, {k[6:]: v for k, v in state.items() if k.startswith("model/")})
        set_optimizer_state_dict(model, optimizer, osd)
        _set_rng({k[4:]: v for k, v in state.items() if k.startswith("rng/")}, _rank())
        if _rank() == 0:
            print(f"resumed from {path} (step {meta['step']}, run {meta.get('run_id')})")
        return path, meta
    if found:
        raise RuntimeError(f"--resume: none of the {len(found)} checkpoint(s) in {out_dir} reads back completely "
                           f"(see the warnings above)")
    return None


# ----------------------------------------------------------------------------------------------
# final/: model-only, consolidated, in the export dtype

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
              torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save_final(path, model, model_config, tokenizer_file, dtype="fp32", meta=None, timeout_s=1800):
    """Write path/ (model.safetensors in `dtype`, config.json, tokenizer.model, train_meta.json):
    each tensor is gathered from its shards in turn (all ranks) and streamed to the file by rank 0,
    which holds one full tensor at a time. Published by renaming path.tmp once fsynced; the other
    ranks then poll for it instead of waiting in a barrier."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    if dtype not in DTYPES:
        raise ValueError(f"final_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES[dtype]
    sd = get_model_state_dict(model)
    if not finite({f"model/{k}": v for k, v in sd.items()}):
        raise FloatingPointError(f"the model's weights are not finite; {path} not written")
    main = _rank() == 0
    keys = sorted(sd)
    conv = {k: out_dtype if torch.is_floating_point(sd[k]) else sd[k].dtype for k in keys}
    header, offset = {}, 0
    for k in keys:
        n = sd[k].numel() * torch.empty(0, dtype=conv[k]).element_size()
        header[k] = {"dtype": _ST_DTYPES[conv[k]], "shape": list(sd[k].shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    tmp = path + ".tmp"
    with removed_on_failure(tmp, path):
        _write_final(path, tmp, sd, keys, conv, header, main, model_config, tokenizer_file, dtype, meta)
    if not main:
        wait_for(os.path.join(path, FINAL_META), timeout_s, "rank 0 writing the final weights")
    return path


def _write_final(path, tmp, sd, keys, conv, header, main, model_config, tokenizer_file, dtype, meta):
    """save_final's writing: rank 0 streams each gathered tensor into tmp/, then publishes it as path."""
    with contextlib.ExitStack() as stack:  # the file is closed on a failure too: its space comes back
        f = None
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
            f = stack.enter_context(open(os.path.join(tmp, "model.safetensors"), "wb"))
            f.write(struct.pack("<Q", len(raw)) + raw)
        for k in keys:
            v = sd[k]
            full = v.full_tensor() if hasattr(v, "full_tensor") else v  # a collective under FSDP
            if main:
                t = full.detach().to("cpu", conv[k]).contiguous()
                if t.numel():
                    f.write(t.view(-1).view(torch.uint8).numpy())
            del full
        if main:
            f.flush()
            os.fsync(f.fileno())
    if main:
        write_json(os.path.join(tmp, "config.json"), {"nanovt": model_config})
        if tokenizer_file:
            from gguf_file import copy_tokenizer, is_gguf
            if is_gguf(tokenizer_file):  # the tokenizer of a GGUF LLM: its tokenizer entries, not its weights
                copy_tokenizer(tokenizer_file, os.path.join(tmp, "tokenizer.model"))
            else:
                shutil.copyfile(tokenizer_file, os.path.join(tmp, "tokenizer.model"))
            fsync_path(os.path.join(tmp, "tokenizer.model"))
        write_json(os.path.join(tmp, FINAL_META), {**(meta or {}), "dtype": dtype})
        fsync_path(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))
