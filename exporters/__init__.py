"""Exporters: one module per target, each a pure function of the checked IR/graph."""
