"""Triton kernels, one op per file, installed as ``minigpt.kernels``.

Import these through ``minigpt.ops``: the dispatch there checks inputs, picks the backend,
and registers the custom ops and autograd. Importing this package imports triton, so
``minigpt`` must be imported first (it decides TRITON_INTERPRET on machines without a GPU).
"""
