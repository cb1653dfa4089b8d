"""Caches: the :class:`~gemma_sessions.cache.protocol.KVCache` interface the scheduler and the engine use
(``protocol``), paged KV (``kv``) laid out by ``layout`` (:class:`~gemma_sessions.cache.layout.LayerShapes`, what it
reads of a model config, and :class:`~gemma_sessions.cache.layout.KVLayout`: layer groups in pages of one size,
whatever their head sizes), recurrent state slots (``state``), and their block bookkeeping.

``blocks`` and ``pool`` import no torch. ``blocks`` holds the pure data (block hashes, :class:`~gemma_sessions.cache.blocks.KVBlock`,
:class:`~gemma_sessions.cache.blocks.FreeBlockQueue`); ``pool`` holds the
:class:`~gemma_sessions.cache.pool.BlockPool` that allocates, shares, caches and evicts blocks.
"""
