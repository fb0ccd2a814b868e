"""imtrial: declarative infrastructure for imaging-based clinical trials."""
__version__ = "0.1.0"
