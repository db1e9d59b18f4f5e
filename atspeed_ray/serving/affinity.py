"""Request affinity for replica-side caches (``cache: replica``): a Ray Serve ``RequestRouter``.

Every draft / verify call of one HTTP request carries the same key (``SessionRef.key``, exposed
as the payload's ``affinity_key``). ``AffinityRouter`` sends all calls with one key to the same
replica: the key's *home* is the replica with the highest hash of (key, replica id) among the
running ones (rendezvous hashing), so the router keeps no per-request state, every handle in
every process agrees, and a scale-up or a replica death moves only the keys of the replicas that
changed. Calls without a key (ping, info, beam search) take the less loaded of two random
replicas, as Serve's default router does.

For ``stick_s`` (``request_router_kwargs``, 1 s) after a call is made, only its home is offered
(a slow queue-length probe on a busy box must not send it elsewhere); after that the other
replicas follow as a second rank, so a home that stays full (``max_ongoing_requests``) or is
gone does not stall the call: it lands elsewhere, misses the cache there and recomputes (same
answer; ``SessionStore`` counts the miss). A home that died leaves the candidates at once.

Configured per deployment by the app builder (``RequestRouterConfig(request_router_class=
AffinityRouter)``, see ``app.py``) when ``cache: replica``.
"""

from __future__ import annotations

import hashlib
import random
import time

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

STICK_S = 1.0  # seconds a call waits for its home replica before any other may take it


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

    stick_s: float = STICK_S

    def initialize_state(self, stick_s: float = STICK_S, **kwargs: object) -> None:
        self.stick_s = stick_s

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
        assert pending_request is not None
        if not rest or time.time() - pending_request.created_at < self.stick_s:
            return [[home]]
        return [[home], rest]
