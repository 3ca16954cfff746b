"""Test support shared by the test modules (tests/ is on sys.path, so `from support.X import ...`).

A test module imports helpers from here, never from another test module. Nothing here may import
the production code it is used to check in a way that would make a check circular: the oracles
(`oracle`, `mirror`) are written from the contract, not from `tkg.kernel`'s backends.
"""
