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
