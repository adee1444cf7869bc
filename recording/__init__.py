"""The recording format: the contract between tracer, rig and analysis.

The tracer and the rig write run directories in this format; the analysis
reads them.  This package depends only on the standard library, numpy and
pyarrow (it runs on a laptop without root or bcc) and imports none of
tracer, vmrig, analysis or slotscope.  Import what you need from its modules:
``schema`` (tables, constants, versions), ``manifest`` (the typed manifest
and its accessors), ``writer``, ``reader``, ``errors``, ``hostfacts``.
"""
