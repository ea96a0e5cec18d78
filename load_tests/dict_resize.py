"""``python -m load_tests.dict_resize``: the longest insert into a dict and an OrderedDict
at the sizes where each grows its hash table and the junk-ids drill's longest turns fell
(2/3 of 2**18, 2**19, 2**20 keys), and into an OrderedDict kept at 500,000 live keys by
dropping the oldest (the session and MF listener caps): its table grows when 699,050 keys
were ever inserted (deleted slots count). Prints (ms, index of that insert)."""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any


def worst_insert(cls: type, n: int, cap: int | None = None) -> tuple[float, int]:
    d: Any = cls()
    worst = (0.0, -1)
    for i in range(n + 10):
        t = time.perf_counter()
        d[f"j0000000-ju{i}"] = i
        dt = time.perf_counter() - t
        if cap is not None and len(d) > cap:
            if cls is OrderedDict:
                d.popitem(last=False)
            else:
                del d[next(iter(d))]
        if i >= n - 10 and dt > worst[0]:
            worst = (dt, i)
    return round(worst[0] * 1e3, 1), worst[1]


if __name__ == "__main__":
    for n in (174_762, 349_525, 699_050):
        print(n, "dict", worst_insert(dict, n), "OrderedDict", worst_insert(OrderedDict, n),
              flush=True)
    print("500k live, 699,050 inserted: OrderedDict",
          worst_insert(OrderedDict, 699_050, cap=500_000))
