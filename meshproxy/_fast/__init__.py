"""Compiled hot paths (Cython). Import them through :mod:`meshproxy.codec`,
which falls back to the pure-Python twins when these are not built."""
