"""Faust's start-up, without the waits a restart does not need (issue #18 item 4).

Measured in the recovery drill's worker log (``python -m load_tests.faults recovery``), a
restarted worker spent, between Faust's "Starting" and its group join:

- ~0.6-0.8 s per topic declaration, four of them (the leader topic and the session table's
  changelog, each declared twice: by their owner and again by the table recovery). Each is
  a metadata request for *every* topic of the cluster plus a CreateTopics request, sent even
  when the topic exists. :func:`declared_topics` lists what Faust would declare; when every
  one of them exists already (one describe request, :func:`stream.adapters.kafka.
  existing_topics`), :func:`declare_nothing` turns Faust's declarations off
  (``topic_allow_declare``). A first start (a topic missing) declares as before, with
  Faust's own topic configuration.
- 1.0 s in ``TableManager.on_start``, a fixed sleep that lets agents add tables while the
  app starts. This worker creates its only table before the app starts
  (:func:`stream.worker.topics.declare_topics`), and a table added later still fails loudly
  (``TableManager.add``: "Too late to add tables"), so :class:`QuickTableManager` starts
  without the sleep on a restart (when :func:`declare_nothing` applied). A first start keeps
  it: the just-created changelog must reach the client's metadata before the first play.
"""

from __future__ import annotations

import logging
from typing import Any

from faust.tables.manager import TableManager

logger = logging.getLogger(__name__)


class QuickTableManager(TableManager):
    """Faust's table manager, started without its fixed one-second sleep (see the module
    docstring). Everything else is Faust's ``TableManager.on_start``."""

    async def on_start(self) -> None:
        if self.app.conf.topic_allow_declare:
            # a first start (a topic was missing): keep Faust's pause. Without it the CI
            # rehearsal's broker-restart test rejected every play of a fresh worker with
            # PartitionsMismatch (the new changelog not yet in the metadata, "0 partitions")
            await self.sleep(1.0)
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


def declared_topics(app: Any) -> list[str]:
    """The topics Faust declares (creates if missing) when ``app`` starts: the leader
    assignor's topic and each table's changelog. The worker's own topics are created before
    (:func:`stream.adapters.kafka.ensure_topics`)."""
    # LeaderAssignor._leader_topic_name's formula (pinned in stream.faustx.compat): the
    # assignor itself is not built here, as building it binds the app to an event loop
    names = [] if app.conf.topic_disable_leader else [f"{app.conf.id}-__assignor-__leader"]
    names += [table.changelog_topic.get_topic_name() for table in app.tables.values()]
    return names


def declare_nothing(app: Any) -> None:
    """Skip Faust's topic declarations (call only when every :func:`declared_topics` exists)."""
    app.conf.topic_allow_declare = False
    logger.info("Faust's internal topics exist: not declaring them again (a restart)")
