"""Small real analysis programs used by the example studies."""
