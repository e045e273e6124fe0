"""``pydocs``: a small English + code corpus that ships with CPython (no download).

Documents, in a fixed order:
  * one per ``pydoc_data.topics`` entry (the language reference topics used by ``help()``),
    sorted by topic name;
  * one per standard-library module in ``MODULES`` (a fixed, sorted list of importable,
    side-effect-free modules): the module docstring followed by the signatures and
    docstrings of its public classes, methods and functions, sorted by name.

Modules that fail to import on this platform are skipped. The corpus is collected in a fresh
``python -I -S`` subprocess, so nothing the calling process imported or patched (and no
site-packages ``.pth`` hook) can change it: it is deterministic for a given CPython version
(recorded in meta.json). Object reprs that contain memory addresses are left out of signatures, and
the interpreter's own path in them reads sys.executable.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import importlib
import inspect
import io
import sys
import warnings

# Public, side-effect-free modules and well-documented submodules. Left out on purpose:
# antigravity/this/turtle*/idlelib/tkinter (GUI, browser or printing on import),
# lib2to3/distutils/ensurepip (write caches or patch things), Windows-only modules,
# curses/readline (terminal state) and the modules deprecated by PEP 594.
MODULES = sorted([
    "abc", "argparse", "array", "ast", "asyncio", "asyncio.events", "asyncio.futures",
    "asyncio.locks", "asyncio.queues", "asyncio.streams", "asyncio.tasks", "base64", "bdb",
    "binascii", "bisect", "builtins", "bz2", "calendar", "cmath", "cmd", "code", "codecs",
    "codeop", "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures",
    "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes",
    "dataclasses", "datetime", "dbm", "decimal", "difflib", "dis", "doctest", "email",
    "email.charset", "email.generator", "email.header", "email.message", "email.parser",
    "email.policy", "email.utils", "enum", "errno", "faulthandler", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "getpass", "gettext", "glob",
    "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http",
    "http.client", "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib",
    "importlib.abc", "importlib.machinery", "importlib.metadata", "importlib.resources",
    "importlib.util", "inspect", "io", "ipaddress", "itertools", "json", "json.decoder",
    "json.encoder", "keyword", "linecache", "locale", "logging", "logging.config",
    "logging.handlers", "lzma", "mailbox", "marshal", "math", "mimetypes", "mmap",
    "modulefinder", "multiprocessing", "multiprocessing.pool", "multiprocessing.shared_memory",
    "netrc", "numbers", "opcode", "operator", "optparse", "os", "os.path", "pathlib", "pdb",
    "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile",
    "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random", "re", "reprlib",
    "rlcompleter", "runpy", "sched", "secrets", "select", "selectors", "shelve", "shlex",
    "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
    "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "sys",
    "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit",
    "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing",
    "unicodedata", "unittest", "unittest.mock", "urllib.error", "urllib.parse",
    "urllib.request", "urllib.robotparser", "uuid", "venv", "warnings", "wave", "weakref",
    "wsgiref.handlers", "wsgiref.simple_server", "wsgiref.util", "wsgiref.validate",
    "xml.dom", "xml.dom.minidom", "xml.etree.ElementTree", "xml.sax", "xml.sax.handler",
    "xml.sax.saxutils", "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport",
    "zlib", "zoneinfo",
])


def _clean(doc) -> str:
    return inspect.cleandoc(doc).strip() if isinstance(doc, str) else ""


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    # platform.architecture(executable=sys.executable): the path of the interpreter that collects the
    # corpus (python or python3, a venv's) must not change it
    return "" if " at 0x" in sig else sig.replace(repr(sys.executable), "sys.executable")


def _defined_in(obj, module) -> bool:
    mod, name = getattr(obj, "__module__", None) or "", module.__name__
    # C implementations often report the private accelerator module (``_json``, ``_io``...).
    return mod == name or mod == "_" + name or mod.lstrip("_") == name.rsplit(".", 1)[-1]


def module_document(module) -> str:
    """Module docstring, then ``name(signature)`` + docstring of each public member."""
    name = module.__name__
    parts = [f"Module {name}", _clean(module.__doc__)]
    public = getattr(module, "__all__", None)
    names = sorted(set(public) if isinstance(public, (list, tuple)) else
                   (n for n in vars(module) if not n.startswith("_")))
    for attr in names:
        obj = vars(module).get(attr)
        if not (inspect.isclass(obj) or inspect.isroutine(obj)) or not _defined_in(obj, module):
            continue
        doc = _clean(obj.__doc__)
        if not doc:
            continue
        kind = "class" if inspect.isclass(obj) else "def"
        parts.append(f"{kind} {name}.{attr}{_signature(obj)}\n{doc}")
        if inspect.isclass(obj):
            for meth in sorted(m for m in vars(obj) if not m.startswith("_")):
                fn = vars(obj)[meth]
                if isinstance(fn, (staticmethod, classmethod)):
                    fn = fn.__func__
                if not (inspect.isroutine(fn) or isinstance(fn, property)):
                    continue
                mdoc = _clean(getattr(fn, "__doc__", None))
                if not mdoc or mdoc == doc:
                    continue
                sig = "" if isinstance(fn, property) else _signature(fn)
                parts.append(f"  {attr}.{meth}{sig}\n{mdoc}")
    return "\n\n".join(p for p in parts if p)


def documents() -> list[str]:
    """The corpus, in a fixed order (deterministic for a given CPython version)."""
    res = subprocess.run([sys.executable, "-I", "-S", __file__], capture_output=True)
    if res.returncode != 0:
        raise RuntimeError(f"collecting the pydocs corpus failed:\n{res.stderr.decode(errors='replace')}")
    return json.loads(res.stdout)


def _collect() -> list[str]:
    from pydoc_data.topics import topics

    docs = [f"{key}\n\n{topics[key].strip()}" for key in sorted(topics)]
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # not available on this platform
                continue
            text = module_document(module)
            if text.count("\n") >= 2:
                docs.append(text)
    return docs


def source_info() -> dict:
    return {"name": "pydocs", "description": "CPython pydoc_data.topics + standard-library docstrings",
            "python": sys.version.split()[0]}


if __name__ == "__main__":  # the clean child process of documents()
    sys.stdout.write(json.dumps(_collect()))
