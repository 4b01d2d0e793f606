"""
The one exception class for a user's mistake, and the one-line message every command prints for it.

A bad file, flag or setting (a config that names an unknown key, a tokenizer that does not read, a
question without text, a refused --resume, a full disk) raises InputError, or an OSError about a file;
train.py, eval.py, sample.py and weights.py print one line for either and exit with status 1, no
traceback (`one_line`). Anything else is a programming error and keeps its traceback.
"""

import errno
import os


class InputError(ValueError):
    """Bad input from the user: a file that is missing, unreadable or malformed, a setting out of bounds,
    a run that refuses to go on. Its message is one line that names the file (or key, or limit)."""


class DiskFull(InputError):
    """A write failed because its file system is full (its temporary files already removed)."""


class InputKeyError(InputError, KeyError):
    """An InputError that callers may also catch as KeyError (missing or unexpected tensor names)."""
    __str__ = ValueError.__str__  # KeyError's would quote the message


class InputRuntimeError(InputError, RuntimeError):
    """An InputError that callers may also catch as RuntimeError (an out_dir in use by another run)."""


class InputExistsError(InputError, FileExistsError):
    """An InputError that callers may also catch as FileExistsError (a non-empty out_dir)."""
    __str__ = ValueError.__str__  # OSError's would want errno and filename


# OSErrors about the user's files and disks, not the program: said in one line
_USER_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR,
                errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.ENAMETOOLONG, errno.ELOOP, errno.EIO}


def oserror_line(e):
    """One line for an OSError about a file or a disk ("no space left on DIR", "read-only file system:
    PATH", ...), or None when it is not one (then it keeps its traceback)."""
    if not isinstance(e, OSError) or e.errno not in _USER_ERRNOS:
        return None
    path = e.filename if e.filename is not None else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {os.path.dirname(os.path.abspath(path)) if path else 'the disk'}" + \
            (f" (writing {path})" if path else "")
    reason = (e.strerror or os.strerror(e.errno))
    reason = reason[0].lower() + reason[1:]
    return f"{path}: {reason}" if path else reason


def one_line(e):
    """The one-line message for a user's error `e`, or None for a programming error."""
    if isinstance(e, InputError):
        return str(e).replace("\n", " ")
    return oserror_line(e)


def find_errno(e, codes):
    """The first exception in e's chain (causes, contexts) that is an OSError with one of `codes`."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in codes:
            return e
        if "No space left on device" in str(e) and errno.ENOSPC in codes:
            return OSError(errno.ENOSPC, "No space left on device")
        e = e.__cause__ or e.__context__
    return None
