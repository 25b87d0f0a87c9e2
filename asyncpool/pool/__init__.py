"""The pool and its checkout: slots, leases, the connection a caller holds, leak reclaim."""

from asyncpool.pool.pool import Pool, create_pool

__all__ = ["Pool", "create_pool"]
