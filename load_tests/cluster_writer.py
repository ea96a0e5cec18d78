"""The writer's cost per document on a single Redis vs a Redis Cluster (issue 18).

    python -m load_tests.cluster_writer --docs 20000

Starts a Redis Cluster through stream.tools.stack_cluster (ports 17000-17005) and uses the shared
single Redis (127.0.0.1:6379); writes ``--docs`` listener documents (~1 KB) through
RecoWriter in batches of 512 and prints wall and CPU seconds per 1,000 documents. Bounded
by ``--docs``; keys are deleted afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

from stream.adapters.redis_store import PendingWrite, RecoWriter, connect_async
from stream.tools import stack, stack_cluster


async def _run(url: str, prefix: str, docs: int) -> dict[str, float]:
    client = connect_async(url)
    writer = RecoWriter(client, ttl_s=300, channel="", flush_interval_ms=0, max_batch=512)
    body = b'{"items": [' + b",".join(b'{"track_id": "t%d", "score": 0.5}' % i for i in range(20))
    writes = [
        PendingWrite(f"{prefix}{i}", 1, body + b"]}", b"{}", 0, None, 0.0, lineage="L")
        for i in range(docs)
    ]
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, docs, 512):
        for w in writes[start : start + 512]:
            writer.pending[w.key] = w
        while writer.pending:
            if not await writer.flush_once():
                raise RuntimeError("flush failed")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for start in range(0, docs, 500):
        for key in [w.key for w in writes[start : start + 500]]:
            await client.delete(key)
    await client.aclose()
    return {"wall_s_per_1k": wall / docs * 1000, "cpu_s_per_1k": cpu / docs * 1000}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--docs", type=int, default=20_000)
    args = p.parse_args()
    base = stack.StackConfig.from_env()
    with tempfile.TemporaryDirectory(prefix="cluster-writer-") as tmp:
        cc = stack_cluster.private_cluster_config(Path(tmp), redis_port=17000)
        stack_cluster.start_redis_cluster(cc)
        try:
            prefix = f"cw{uuid.uuid4().hex[:6]}:reco:"
            out = {
                "docs": args.docs,
                "single": asyncio.run(
                    _run(f"redis://127.0.0.1:{base.redis_port}/0", prefix, args.docs)
                ),
                "cluster_3_primaries": asyncio.run(_run(cc.redis_url, prefix, args.docs)),
            }
        finally:
            stack_cluster.stop_redis_cluster(cc)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
