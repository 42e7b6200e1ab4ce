"""Shared library of loratools: file I/O, formats, low-rank maths, merge methods, metadata."""

__version__ = "0.1.0"
