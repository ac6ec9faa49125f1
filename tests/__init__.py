"""The bpfs test suite (see tests/helpers/__init__.py for the layout).

A regular package so that ``tests.helpers`` is one importable name for the tests, for the
child processes the network lab starts (``python -m tests.helpers.netlab ...``) and for
``bench/``, and so that no installed package called ``tests`` can stand in for it. The test
folders (unit/, mount/, net/, partners/, broker/) are not packages: pytest imports their files
by their own (unique) names.
"""
