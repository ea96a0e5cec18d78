"""Operator and developer tools: the ``stream`` CLI and what it runs besides the worker.

The CLI entry point, the local stack (single broker, cluster, and SASL/TLS Kafka), the demo, the
``top`` terminal view, the event producer, offline replay on datasets, dataset loaders and the
catalogue loader. Nothing in the worker's hot path imports from here.
"""
