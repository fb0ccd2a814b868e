"""The protocol designer's desk: ``imtrial explain-code | completion | lsp``."""
from __future__ import annotations

import sys

from .common import EXIT_OK, UsageError, command

SHELLS = ("bash", "zsh", "fish")


def cmd_explain_code(args) -> int:
    from ..codes import explain, plain, suggest, table

    if not args.code:
        for code, e in table().items():
            print(f"{code}  {plain(e['meaning'])}")
        return EXIT_OK
    e = explain(args.code)
    if e is None:
        hint = suggest(args.code)
        raise UsageError(f"unknown diagnostic code {args.code!r}" + (f"; {hint}" if hint else "")
                         + " ('imtrial explain-code' lists them all)")
    print(f"{e['code']}: {plain(e['meaning'])}")
    if e.get("example"):
        print(f"  example:   {plain(e['example'])}")
    if e.get("raised_as"):
        print(f"  raised as: {plain(e['raised_as'])}")
    print(f"  see:       {e['doc']}, section \"{e['section']}\"")
    return EXIT_OK


def cmd_completion(args) -> int:
    import argcomplete

    sys.stdout.write(argcomplete.shellcode(["imtrial"], shell=args.shell))
    return EXIT_OK


def cmd_lsp(args) -> int:
    from ..lsp.server import serve

    serve()
    return EXIT_OK


def register(sub) -> None:
    """Add the designer's desk commands to the ``imtrial`` subparsers."""
    p = command(sub, "explain-code", "explain a diagnostic code (error[E301] → what it means, an example)", examples=[
        "imtrial explain-code E301", "imtrial explain-code"],
        details="The entry of the code in docs/diagnostics.md (or docs/language.md for syntax and lowering "
                "codes). Without a code, every code with its one-line meaning.")
    p.add_argument("code", nargs="?", metavar="CODE", help="a code as diagnostics print it, e.g. E301 or W404")
    p.set_defaults(func=cmd_explain_code)

    p = command(sub, "completion", "print the shell completion script (bash, zsh or fish)", examples=[
        'imtrial completion bash > ~/.local/share/bash-completion/completions/imtrial',
        'imtrial completion zsh > "${fpath[1]}/_imtrial"',
        "imtrial completion fish > ~/.config/fish/completions/imtrial.fish"],
        details="Completes commands, options, their choices and file names (argcomplete). Load it in the "
                "current shell with: eval \"$(imtrial completion bash)\".")
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(func=cmd_completion)

    p = command(sub, "lsp", "run the language server for editors (LSP over stdin/stdout)", examples=[
        "imtrial lsp"],
        details="Diagnostics as you type, completion (keywords, DICOM keywords with VR and unit, the study's "
                "names, units, de-identification options), hover, go to definition, references, outline, "
                "formatting and quick fixes for 'did you mean' hints. Editors start it themselves: see "
                "docs/editors.md (VS Code, Neovim, Emacs).")
    p.set_defaults(func=cmd_lsp)
