"""Test data for the operations tests (tests/test_ops_*.py)."""
