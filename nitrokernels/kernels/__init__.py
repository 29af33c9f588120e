"""Triton kernels, one module per kernel family. Nothing here knows about nn.Modules or autograd.

Import these modules lazily (from the op's Triton backend): whether Triton interprets kernels on the CPU
(TRITON_INTERPRET=1) is decided when a kernel module is imported.
"""
