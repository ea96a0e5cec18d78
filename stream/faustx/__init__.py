"""Faust and aiokafka adaptations: every place the worker reaches into Faust's internals.

A batched changelog table, the in-loop consumer (no consumer thread) and the fast delivery of
fetched records to the agent. Keeping them here confines Faust-version-specific code to one
package; the rest of the worker composes these parts.
"""
