"""bpfs: an encrypted, deduplicating backup filesystem that replicates to partner peers.

The package is layered (see README.md, "How it works"): cli -> daemon -> fs (FUSE) ->
data (write buffers, chunk pipeline, extents, reads) -> chunkmap / index (LMDB) / packs (files on
the drive) -> crypto, chunker, keyfile, identity.
"""

__version__ = "0.1.0"
