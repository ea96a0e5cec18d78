"""The recommendation core: pure logic with no Kafka, Redis, Faust or Prometheus (transitively).

Parsing and validating play events, per-listener sessions, the recommender and its models
(``core.models``, numba kernels), ranking and reasons, contexts, the track catalogue, the
prequential evaluation, the signed data-only checkpoint format and memory sizing. Everything here
is deterministic given its inputs and is tested without any service running.
"""
