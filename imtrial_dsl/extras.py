"""The optional parts of imtrial and what they need: ``pip install imtrial`` is enough to design a study
(check, fmt, graph, compile, explain, lsp); the extras add the heavy tools.

| extra | adds | commands |
| --- | --- | --- |
| ``cwl`` | cwltool, cwl-utils, Toil | ``imtrial export cwl`` |
| ``docs`` | WeasyPrint | the PDFs of ``imtrial export docs`` |
| ``ops`` | aiosmtpd | a local SMTP receiver for trying ``imtrial reminders`` |

A command that needs an extra imports it with :func:`load`, at the place of use; when the extra is not
installed the user gets E900 naming the extra to install, instead of a traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .diagnostics import ImtrialError

# top-level import name -> the extra that provides it
PROVIDED_BY = {"cwl_utils": "cwl", "cwltool": "cwl", "toil": "cwl", "ruamel": "cwl", "weasyprint": "docs",
               "aiosmtpd": "ops"}


class MissingExtra(ImtrialError):
    """E900: a command needs an optional extra that is not installed."""

    code = "E900"


def load(module: str, purpose: str) -> ModuleType:
    """``import module``; :class:`MissingExtra` naming its extra when the extra is not installed.

    ``purpose`` says what needed it ("writing PDF documents"). An import error *inside* an installed
    package (a bug, or a broken install) is not hidden: it propagates as it is.
    """
    top = module.partition(".")[0]
    extra = PROVIDED_BY[top]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != top:
            raise
        raise MissingExtra(f"{purpose} needs the '{extra}' extra, which is not installed (no module {exc.name!r})",
                           hint=f"pip install 'imtrial[{extra}]'") from None
