"""The attack drill's CI variant (load_tests.attacks, issue 15): every attack of the
security review against the real stack and a real worker, each contained."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from load_tests import attacks
from stream.config import Settings

pytestmark = pytest.mark.integration

#: attacks whose defences live on other branches (issue 15 item 1): expected NOT
#: contained here. The test fails once one of them is contained, so that the entry is
#: removed when those defences are merged -- the set must end up empty.
PENDING: dict[str, str] = {}


# 22 attacks, one worker: 95 s on a quiet box, 208 s in a loaded suite run (load average
# ~20 on the 2 shared cores), too close to the 300 s default
@pytest.mark.timeout(600)
def test_every_attack_is_contained(
    settings: Settings, worker_factory: Callable[..., Any]
) -> None:
    report = attacks.run_attacks(settings, lambda s: worker_factory(s), short=True)
    by_name = {r["attack"]: r for r in report["attacks"]}
    assert set(by_name) == {a.name for a in attacks.ATTACKS}, "the drill stopped early"
    assert report["baseline_canary_fresh"]
    escaped = {n: r for n, r in by_name.items() if not r["contained"] and n not in PENDING}
    assert not escaped, f"attacks not contained: {escaped}"
    now_contained = [n for n in PENDING if by_name[n]["contained"]]
    assert not now_contained, f"contained now, remove from PENDING: {now_contained}"
    # the drill's evidence is real: each refusal was counted and dead-lettered
    assert report["dlq_reasons"].get("key_mismatch", 0) >= 3
    assert report["dlq_reasons"].get("control_character", 0) >= 5
    assert by_name["signal-oversized-ts"]["evidence"]["applied"] == 1
