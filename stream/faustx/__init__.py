"""The seam: every adaptation of Faust, mode and aiokafka the worker makes, in one package.

Installed through Faust's own extension points (docs/architecture.md, "The Faust seam"):

- :mod:`~stream.faustx.app`: :func:`create_app`, the worker's configured ``faust.App``, after
  the start-up compat check (:mod:`~stream.faustx.compat`);
- :mod:`~stream.faustx.transport`: the ``faustx://`` transport (Faust's transport registry /
  ``faust.transports`` entry point) with the seam's consumer and producer;
- :mod:`~stream.faustx.consumer`: the consumer on the event loop, the fetch wait, resume after
  seek; :mod:`~stream.faustx.delivery`: the fetcher's direct hand-over;
- :mod:`~stream.faustx.producer`: the commit flush that waits for the changelog;
- :mod:`~stream.faustx.stream`: the batching stream with manual acks (``App(Stream=...)``);
- :mod:`~stream.faustx.changelog_table`: the batched changelog table (``App(Table=...)``);
- :mod:`~stream.faustx.kafka_client`: the two private aiokafka calls the project needs.

No module outside this package uses a private Faust or aiokafka attribute
(tests/unit/test_faust_seam.py checks).
"""
