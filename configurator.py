"""
Config files and command-line overrides, read into a dataclass (train.py's TrainConfig).

    python train.py CONFIG_FILE [--key=value ...] [--field.entry=value ...]

A config file is plain Python that assigns fields of the dataclass; files and `--key=value`
overrides apply left to right, a later one winning. A value on the command line takes the type of
the field's default (a bool flag alone, `--compile`, means true); tuples, lists, dicts and None are
Python literals. `--hook.dir=x` sets one entry of a dict field, after the files are read, and
`--model.decoder.layers=2` one entry of a dict inside it. An unknown
key is an error that names the file, or the command line.
"""

import ast
import dataclasses
import os
import sys
from dataclasses import fields

from errors import InputError


def coerce(name, value, default):
    """Turn a command-line string into the type of the field's default."""
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"--{name}: expected true/false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return type(default)(value)
        except ValueError:
            raise InputError(f"--{name}: expected {type(default).__name__}, got {value!r}") from None
    if isinstance(default, str):
        return value
    try:  # tuples, lists, dicts, None
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise InputError(f"--{name}: cannot parse {value!r} as a Python literal") from None


def set_entry(fields, path, key, val, where):
    """A copy of the dict `fields` with the entry at `path` (a list of keys, one per dot of --key)
    set to `val`: --model.decoder.layers=2 sets model["decoder"]["layers"]."""
    if not isinstance(fields, dict):
        raise InputError(f"--{key}: {where} is not a dict")
    fields = dict(fields)
    sub, rest = path[0], path[1:]
    if rest:
        fields[sub] = set_entry(fields.get(sub, {}), rest, key, val, f"{where}.{sub}")
    elif sub in fields:  # the type of the entry the config gives
        fields[sub] = coerce(key, val, fields[sub])
    else:  # a new entry: a Python literal, else the string itself
        try:
            fields[sub] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            fields[sub] = val
    return fields


def check_fields(cls, d, where):
    """Every key of `d` is a field of the dataclass `cls`; else a ValueError naming `where`."""
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise InputError(f"{where}: unknown config key {k!r}")


def exec_config(path, scope):
    """Run a config file in `scope`. A file that cannot be read, is not Python, or fails while it runs is
    an InputError naming the file and the line (a config file is the user's, not the program's)."""
    try:
        with open(path) as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read config {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        code = compile(source, path, "exec")
    except SyntaxError as e:
        raise InputError(f"{path}, line {e.lineno}: {e.msg}") from None
    try:
        exec(code, scope)  # a config file is plain Python
    except Exception as e:
        import traceback
        line = next((fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__)) if fr.filename == path), "?")
        raise InputError(f"{path}, line {line}: {type(e).__name__}: {e}") from None


def parse(cls, argv):
    """argv: [CONFIG_FILE] [--key=value ...] -> an instance of the dataclass `cls`."""
    values, entries = {}, []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, val = arg[2:].partition("=")
            key = key.replace("-", "_")
            if "." in key:  # --hook.dir=x: one entry of a dict field, set after the files are read
                entries.append((key, val))
                continue
            default = getattr(cls(), key, None)
            check_fields(cls, [key], "command line")
            values[key] = True if not eq and isinstance(default, bool) else coerce(key, val, default)
        else:
            scope = {"__file__": os.path.abspath(arg)}  # a config may build on another beside it
            exec_config(arg, scope)
            file_values = {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
                           and not isinstance(v, type(sys))}
            check_fields(cls, file_values, arg)
            values = {**file_values, **values}
    for key, val in entries:
        name, *path = key.split(".")
        check_fields(cls, [name], "command line")
        values[name] = set_entry(values.get(name, getattr(cls(), name)), path, key, val, name)
    return cls(**values)


# ----------------------------------------------------------------------------------------------
# a model config's sizes, checked before anything is built (model.VTLMMConfig.from_dict, weights.py)


class ConfigError(InputError):
    """A model config that is malformed or out of bounds; the message names the file and the key.
    train.py, eval.py, sample.py and weights.py print it as one line (errors.InputError)."""


# Sane bounds on a config's sizes, checked before anything is built (the meta-device model of a config
# with a million layers would take minutes and gigabytes to reach the first missing tensor): far above
# every released model (LLaMA-3-405B: 126 layers, width 16384, 128k vocabulary), far below what would
# not fit in a machine's memory even on the meta device.
CONFIG_BOUNDS = {
    "vision.image_size": (1, 8192), "vision.patch_size": (1, 1024), "vision.width": (1, 1 << 15),
    "vision.layers": (1, 512), "vision.heads": (1, 1024), "vision.mlp": (1, 1 << 18),
    "vision.select_layer": (-512, 511),
    "decoder.vocab_size": (1, 1 << 21), "decoder.dim": (1, 1 << 16), "decoder.layers": (1, 1024),
    "decoder.heads": (1, 1024), "decoder.kv_heads": (1, 1024), "decoder.hidden": (1, 1 << 19),
    "decoder.max_seq_len": (1, 1 << 24), "decoder.head_dim": (1, 4096), "decoder.sliding_window": (1, 1 << 24),
}


def param_count(cfg):
    """The model's parameter count from its config alone (what VTLMM(cfg) would hold; tests/test_model.py
    checks it against the built model)."""
    v, d = cfg.vision, cfg.decoder
    w, hd = v.width, d.hd
    vision = 3 * v.patch_size ** 2 * w + w + (v.num_patches + 1) * w + 4 * w \
        + v.layers * (4 * w + 4 * (w * w + w) + w * v.mlp + v.mlp + v.mlp * w + w)
    adapter = w * d.dim + d.dim + d.dim * d.dim + d.dim
    block = 2 * d.dim + d.dim * d.heads * hd + 2 * d.dim * d.kv_heads * hd + d.heads * hd * d.dim + 3 * d.dim * d.hidden
    decoder = d.vocab_size * d.dim + d.layers * block + d.dim
    return vision + adapter + decoder + 2 * d.vocab_size * d.dim  # + the MM and VM heads


def check_config(cfg, where="the model config", weights_bytes=None):
    """Check a config before anything is built: every size an integer within CONFIG_BOUNDS, the heads
    dividing the width, kv_heads dividing heads, a patch no larger than the image. With `weights_bytes`
    (the size of the files the weights come from), a config that describes more parameters than those
    bytes can hold at 2 bytes each is refused too: the config and the weights do not belong together.
    Raises ConfigError naming `where` and the key; the parameter count and the files' size are in it."""
    def sizes():
        n = None
        try:
            n = param_count(cfg)
        except Exception:
            pass
        text = f"{n:,} parameters" if n is not None else "an uncountable model"
        return f" (the config describes {text}" + (f"; the weights are {weights_bytes:,} bytes)" if weights_bytes
                                                   is not None else ")")

    for part in ("vision", "decoder"):
        sub = getattr(cfg, part)
        for f in fields(sub):
            key, value = f"{part}.{f.name}", getattr(sub, f.name)
            if key not in CONFIG_BOUNDS:
                if f.type in (float, "float") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                   or not value > 0):
                    raise ConfigError(f"{where}: {key} = {value!r}: a positive number is expected")
                continue
            if value is None and f.default is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{where}: {key} = {value!r}: a whole number is expected")
            lo, hi = CONFIG_BOUNDS[key]
            if not lo <= value <= hi:
                raise ConfigError(f"{where}: {key} = {value:,} is outside the sane range {lo:,} to {hi:,}" + sizes())
    v, d = cfg.vision, cfg.decoder
    if v.width % v.heads:
        raise ConfigError(f"{where}: vision.heads = {v.heads} does not divide vision.width = {v.width}")
    if v.patch_size > v.image_size:
        raise ConfigError(f"{where}: vision.patch_size = {v.patch_size} is larger than vision.image_size = "
                          f"{v.image_size}")
    if d.head_dim is None and d.dim % d.heads:
        raise ConfigError(f"{where}: decoder.heads = {d.heads} does not divide decoder.dim = {d.dim} "
                          f"(or give head_dim)")
    if d.heads % d.kv_heads:
        raise ConfigError(f"{where}: decoder.kv_heads = {d.kv_heads} does not divide decoder.heads = {d.heads}")
    if isinstance(cfg.image_token_id, bool) or not isinstance(cfg.image_token_id, int):
        raise ConfigError(f"{where}: image_token_id = {cfg.image_token_id!r}: a whole number is expected")
    if weights_bytes is not None and 2 * param_count(cfg) > weights_bytes:
        raise ConfigError(f"{where} does not describe these weights" + sizes() + ", fewer than 2 bytes a parameter")
    return param_count(cfg)
