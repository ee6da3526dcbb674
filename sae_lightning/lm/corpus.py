"""Local corpora on every machine: Python's own documentation, and its licence text.

``pydoc_data.topics`` holds the language reference sections that ``help()`` shows, and the
standard library's docstrings add API prose. Both ship with CPython, so a recipe can train on
real text offline. The text differs a little between Python versions; the packed token count
is printed by ``sae-lightning cache``.
"""

from __future__ import annotations

import importlib
import inspect
import sysconfig
import warnings
from pathlib import Path

STDLIB_MODULES = """
abc argparse array ast asyncio base64 bisect calendar collections concurrent.futures
configparser contextlib copy csv dataclasses datetime decimal difflib email enum fractions
functools glob gzip hashlib heapq hmac html http.client importlib inspect io ipaddress
itertools json logging math mimetypes multiprocessing numbers operator os pathlib pickle pprint
queue random re sched secrets shlex shutil signal socket sqlite3 statistics string struct
subprocess tarfile tempfile textwrap threading time timeit tokenize traceback types typing
unittest urllib.parse uuid warnings weakref zipfile zlib bz2 cmd code codecs codeop colorsys
compileall contextvars copyreg dis doctest filecmp fileinput fnmatch ftplib getopt gettext
graphlib imaplib locale lzma mailbox netrc optparse pdb pickletools platform plistlib poplib
profile pstats pydoc quopri reprlib runpy selectors shelve smtplib socketserver stat symtable
sysconfig tabnanny trace tracemalloc unicodedata wave xml.dom.minidom xml.etree.ElementTree
xmlrpc.client zipapp zipimport wsgiref.simple_server email.message urllib.request http.server
http.cookiejar
"""
"""Modules whose docstrings are included, whitespace-separated (imported only; chosen to have no
side effects on import)."""


def python_docs() -> list[str]:
    """Documents: every ``pydoc_data.topics`` entry, then each module's docstrings."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    for name in STDLIB_MODULES.split():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except ImportError:
            continue
        docs.append(_module_text(module))
    return [d for d in docs if d.strip()]


def python_license() -> list[str]:
    """One document: the licence text of this Python (``LICENSE.txt`` in its standard library).

    Legal prose, unlike the documentation: an evaluation corpus of a different kind.

    Raises:
        FileNotFoundError: this Python ships no licence file.
    """
    path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    return [path.read_text(encoding="utf-8")]


def _module_text(module: object) -> str:
    """The module docstring and those of its public classes, functions and methods."""
    parts = [inspect.getdoc(module) or ""]
    for attr in sorted(vars(module)):
        obj = vars(module)[attr]
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:  # type: ignore[attr-defined]
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{attr}: {doc}")
            if inspect.isclass(obj):
                for name, member in sorted(vars(obj).items()):
                    if not name.startswith("_") and inspect.isfunction(member):
                        mdoc = inspect.getdoc(member)
                        if mdoc:
                            parts.append(f"{attr}.{name}: {mdoc}")
    return "\n\n".join(p for p in parts if p)
