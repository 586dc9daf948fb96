"""Things a client holds open at once (progress streams, uploads), counted in Redis so that
every process of a service shares the cap.

Each open thing holds a member of its client's sorted set, scored with the time it lapses; it
renews its member while it runs and removes it when it ends. A process that dies without
removing its members frees them when they lapse (`SLOT_TTL_S`).
"""

from __future__ import annotations

import time
import uuid

import anyio
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


class ClientSlots:
    """At most `cap` things of one kind (`kind`) open per client, whichever process serves
    them."""

    def __init__(
        self, redis_client: aioredis.Redis, *, kind: str, cap: int, ttl_s: float = SLOT_TTL_S
    ) -> None:
        """`ttl_s`: how long a slot lives unless renewed."""
        self.redis = redis_client
        self.kind = kind
        self.cap = cap
        self.ttl_s = ttl_s

    def key(self, client: str) -> str:
        return f"tessera:{self.kind}:{client}"

    async def acquire(self, client: str) -> str | None:
        """A slot for one more of `client`'s (its member), or None at the cap."""
        member = uuid.uuid4().hex
        now = time.time()
        args = (str(now), str(now + self.ttl_s), str(self.cap), member)
        taken = await self.redis.eval(_ACQUIRE, 1, self.key(client), *args)  # type: ignore[misc]
        return member if int(taken) == 1 else None

    async def renew(self, client: str, member: str) -> None:
        """Keep the slot from lapsing while its holder runs."""
        await self.redis.zadd(self.key(client), {member: time.time() + self.ttl_s}, xx=True)

    async def release(self, client: str, member: str) -> None:
        """Give the slot back (also when the caller is being cancelled)."""
        with anyio.CancelScope(shield=True):
            await self.redis.zrem(self.key(client), member)

    async def open_count(self, client: str) -> int:
        """`client`'s slots held now (lapsed members excluded)."""
        return int(await self.redis.zcount(self.key(client), time.time(), "+inf"))
