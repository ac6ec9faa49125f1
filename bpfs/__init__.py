"""bpfs: an encrypted, deduplicating backup filesystem that replicates to partner peers.

The package is layered (see README.md, "Architecture"): cli -> daemon -> fs (FUSE) ->
filedata (write buffers, extents) -> index (LMDB) / packs (files on the drive) ->
crypto, chunker, keyfile, identity.
"""

__version__ = "0.1.0"
