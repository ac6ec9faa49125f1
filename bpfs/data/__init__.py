"""The file-data layer: file contents in chunks, packs and extents.

Writes land in a per-inode buffer (`buffers`) and return at once; a drain (`pipeline`) cuts the
buffer into content-defined chunks, hashes them (keyed), skips chunks the store already holds
(dedup) and all-zero chunks (holes), seals the rest into the open pack of the inode's lane from
worker threads, and records extents (`extents`) and references (`bpfs.chunkmap`) in one atomic
index section. Reads (`reads`) combine the extents with whatever is still buffered. Sparse packs
are compacted, and chunks replicable files use are moved out of local packs (`compaction`); a
committer (`committer`) checkpoints every second. `filedata.FileData` is what the mount uses, and
where durability is defined.

Modules: buffers (write buffers), pipeline (chunks into packs, extents into the index), extents
(the extent map), reads (reads, chunk cache, `read_chunk`), compaction (moving chunks between
packs), filedata (`FileData` and its committer).
"""

from .reads import ChunkCache, ChunkLoads, load_chunk, read_chunk
from .filedata import FileData

__all__ = ["ChunkCache", "ChunkLoads", "FileData", "load_chunk", "read_chunk"]
