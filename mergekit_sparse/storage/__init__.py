"""Storage: everything that touches a checkpoint or a mask file on disk.

dtypes (safetensors codes, bit-exact bf16 in numpy), checkpoint (open files, folders, shards and Hub
cache ids lazily; read one tensor at a time from read-only mappings), writer (stream tensors out
header-first, atomically), masks (packed-bit mask files), scope (which tensors take part), and
atomic (the one helper that writes small files such as JSON side files atomically).
Never imports torch at module level: the data plane is numpy.
"""
