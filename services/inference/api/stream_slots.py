"""Open progress streams per client, counted in Redis so that every API process shares the cap.

Each open stream holds a member of its client's sorted set, scored with the time it lapses;
a stream renews its member while it runs and removes it when it ends. A process that dies
without removing its members frees them when they lapse (`SLOT_TTL_S`).
"""

from __future__ import annotations

import time
import uuid

import redis.asyncio as aioredis

SLOT_TTL_S = 60.0

# KEYS[1]: the client's set. ARGV: now, lapses at, cap, member.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[2] - ARGV[1]) + 1)
return 1
"""


def slots_key(client: str) -> str:
    return f"tessera:streams:{client}"


class StreamSlots:
    """At most `cap` open streams per client, whichever API process serves them."""

    def __init__(self, redis_client: aioredis.Redis, *, cap: int) -> None:
        self.redis = redis_client
        self.cap = cap

    async def acquire(self, client: str) -> str | None:
        """A slot for one more stream of `client` (its member), or None at the cap."""
        member = uuid.uuid4().hex
        now = time.time()
        args = (str(now), str(now + SLOT_TTL_S), str(self.cap), member)
        taken = await self.redis.eval(_ACQUIRE, 1, slots_key(client), *args)  # type: ignore[misc]
        return member if int(taken) == 1 else None

    async def renew(self, client: str, member: str) -> None:
        """Keep the slot from lapsing while its stream runs."""
        await self.redis.zadd(slots_key(client), {member: time.time() + SLOT_TTL_S}, xx=True)

    async def release(self, client: str, member: str) -> None:
        await self.redis.zrem(slots_key(client), member)

    async def open_count(self, client: str) -> int:
        """Streams of `client` open now (lapsed members excluded)."""
        return int(await self.redis.zcount(slots_key(client), time.time(), "+inf"))
