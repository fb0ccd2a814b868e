"""The language server behind ``imtrial lsp``: ``analysis`` (names, diagnostics, hovers as plain values),
``complete`` (what may be written where), ``server`` (the pygls glue; imported by ``imtrial lsp`` only)."""
