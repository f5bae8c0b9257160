"""
Results that come now or later: registry operations answer with a plain
value (the in-memory registry) or a ``Deferred`` of it (Redis); callers
handle both with these two helpers instead of wrapping everything in
Deferreds on the hot path.
"""

from twisted.internet.defer import Deferred

# What registry operations and deliveries answer when they answer at once
# (an isinstance check against Deferred, an abstract class, costs ~4x more)
_PLAIN = frozenset({type(None), bool, int, list, tuple})


def is_deferred(result) -> bool:
    return type(result) not in _PLAIN and isinstance(result, Deferred)


def then(result, callback):
    """Apply ``callback`` to a plain result now, or to a Deferred's result later."""
    if is_deferred(result):
        return result.addCallback(callback)
    return callback(result)
