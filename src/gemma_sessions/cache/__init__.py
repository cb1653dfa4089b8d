"""Paged KV-cache bookkeeping: block ids, refcounts, prefix hashes and the LRU free queue (no torch here).

``blocks`` holds the pure data (block hashes, :class:`~gemma_sessions.cache.blocks.KVBlock`,
:class:`~gemma_sessions.cache.blocks.FreeBlockQueue`); ``pool`` holds the
:class:`~gemma_sessions.cache.pool.BlockPool` that allocates, shares, caches and evicts blocks.
"""
