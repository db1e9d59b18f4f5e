"""Request affinity for replica-side caches (``cache: replica``): a Ray Serve ``RequestRouter``.

Every draft / verify call of one HTTP request carries the same key (``SessionRef.key``, exposed
as the payload's ``affinity_key``). ``AffinityRouter`` sends all calls with one key to the same
replica: the key's *home* is the replica with the highest hash of (key, replica id) among the
running ones (rendezvous hashing), so the router keeps no per-request state, every handle in
every process agrees, and a scale-up or a replica death moves only the keys of the replicas that
changed. Calls without a key (ping, info, beam search) take the less loaded of two random
replicas, as Serve's default router does.

The home is the first rank; the other replicas are the second, so a home that is full (its
``max_ongoing_requests`` reached) or gone does not stall the call: it lands elsewhere, misses the
cache there and recomputes (same answer; ``SessionStore`` counts the miss).

Configured per deployment by the app builder (``RequestRouterConfig(request_router_class=
AffinityRouter)``, see ``app.py``) when ``cache: replica``.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def affinity_key(pending: PendingRequest | None) -> str | None:
    """The key of a routed call: the ``affinity_key`` of its first argument (None: no key)."""
    if pending is None or not pending.args:
        return None
    key = getattr(pending.args[0], "affinity_key", None)
    return key if isinstance(key, str) else None


def home_rank(key: str, replica_ids: list[str]) -> list[int]:
    """Indices of ``replica_ids`` by rendezvous hash of (key, id), best first."""
    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}|{rid}".encode(), digest_size=8).digest()

    return sorted(range(len(replica_ids)), key=lambda i: weight(replica_ids[i]), reverse=True)


class AffinityRouter(RequestRouter):
    """The calls of one request to its home replica (see the module docstring)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None
                              ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:  # every replica tried: back off before the next try
            pending_request.routing_context.should_backoff = True
        key = affinity_key(pending_request)
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        order = home_rank(key, [r.replica_id.unique_id for r in candidate_replicas])
        home, rest = candidate_replicas[order[0]], [candidate_replicas[i] for i in order[1:]]
        return [[home], rest] if rest else [[home]]
