"""Processing: what the worker does with one record, independent of how it arrives.

The pipeline turns one Kafka record into an outcome (session update, ranking, a pending Redis
write, or a counted rejection); replication encodes and validates the item signals workers share;
control admits operator commands; auth signs and verifies those messages; ratelog keeps rejection
logs bounded. It uses :mod:`stream.core` and hands writes to :mod:`stream.adapters`.
"""
