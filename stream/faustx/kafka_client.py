"""The two aiokafka calls the project makes that aiokafka does not offer publicly.

- :func:`cluster_metadata`: the metadata of every topic, fetched now (a consumer without a
  group knows only the topics it was assigned; ``partitions_for_topic`` answers from that).
- :func:`send_admin_request`: send a Kafka protocol request through an admin client (aiokafka
  0.14's admin client has no ACL calls; the local secure stack creates and reads ACLs with
  the protocol's own requests).

stream.faustx.compat pins both private aiokafka methods they call.
"""

from __future__ import annotations

from typing import Any


async def cluster_metadata(consumer: Any) -> Any:
    """A fresh ``ClusterMetadata`` of every topic, through ``consumer``'s client."""
    return await consumer._client.fetch_all_metadata()


async def send_admin_request(admin: Any, request: Any) -> Any:
    """Send a protocol ``request`` to the cluster through ``admin``; returns the response."""
    return await admin._send_request(request)
