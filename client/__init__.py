"""`tkg.client`: the thin client (numpy in, numpy out) and the load-test tool.

Imports neither torch nor `tkg.server`: this is what orchestrators embed.
"""
