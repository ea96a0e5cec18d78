"""The seam's Faust transport: Faust's aiokafka driver with :class:`SeamConsumer` and
:class:`CommitFlushProducer`, registered in Faust's transport registry under the broker URL
scheme ``faustx://`` (:func:`register`; the package also declares it as a ``faust.transports``
entry point, Faust's plug-in mechanism for transports).
"""

from __future__ import annotations

from faust.transport import drivers
from faust.transport.drivers import aiokafka

from stream.faustx.consumer import SeamConsumer
from stream.faustx.producer import CommitFlushProducer

#: the broker URL scheme that selects this transport (``faustx://host:port``)
SCHEME = "faustx"
#: where Faust's registry finds it (also the ``faust.transports`` entry point in pyproject)
SYMBOL = "stream.faustx.transport:Transport"


class Transport(aiokafka.Transport):
    """Faust's aiokafka transport with the seam's consumer and producer."""

    Consumer = SeamConsumer
    Producer = CommitFlushProducer


def register() -> None:
    """Make ``faustx://`` resolve to :class:`Transport` in Faust's transport registry (an
    installed package gets it from its entry point too; a checkout on PYTHONPATH does not)."""
    registry = drivers.TRANSPORTS
    registry[SCHEME] = SYMBOL
    if drivers.by_name(SCHEME) is not Transport:
        raise RuntimeError(f"Faust's transport {SCHEME!r} is not {SYMBOL}")
