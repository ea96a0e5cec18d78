"""Adapters to the outside services: the Redis store, Kafka helpers and Prometheus metrics.

``redis_store`` writes and reads recommendation documents and checkpoints in Redis; ``kafka``
creates topics, builds clients and producers and reads partitions back; ``metrics`` defines and
exports every Prometheus series. Names of keys, topics and metrics here are wire formats.
"""
