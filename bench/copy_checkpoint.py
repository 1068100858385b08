"""Copy a checkpoint through CheckpointWriter (the streaming writer), optionally resharding."""

import sys
from pathlib import Path

from mergekit_sparse.storage.checkpoint import Checkpoint
from mergekit_sparse.storage.writer import CheckpointWriter

src, dst = Checkpoint.open(sys.argv[1]), Path(sys.argv[2])
plan = [(n, i.dtype, i.shape) for n, i in src.infos.items()]
with CheckpointWriter(dst, plan, folder=True, reference=src.folder, shard_bytes=int(5e8), force=True) as w:
    for n in src.names:
        w.write(n, src.tensor(n))
