"""Serving: AtSpeed speculative beam search behind Ray Serve.

* ``config``     pydantic settings (app builder args) and the HTTP request/response schemas
* ``catalog``    item index + prompt format the ingress and the replicas share
* ``batching``   the replica-side work, batched over requests (pure torch, no Ray)
* ``driver``     the ingress side: the decoding core's loop with remote draft/target calls
* ``routing``    adaptive routing of strict requests (speculative or target alone)
* ``deployments`` ``DraftModel``, ``TargetModel`` and the ingress ``Recommender`` (Ray Serve)
* ``app``        app builders for ``serve run`` YAML configs (``import_path: atspeed_ray.serving.app:build_app``)
* ``loadtest``   the loopback-only load tool
* ``commands``   ``atspeed-ray serve`` and ``atspeed-ray loadtest``

Nothing here is imported by ``atspeed_ray.decoding``: the decoding core stays free of Ray.
"""
