"""Packaging of cares as the one-file zipapp cares.pyz.

build.py is the builder that build_zipapp.sh runs; bootstrap.py is copied into
the archive as its __main__.py. Neither imports cares.
"""
