"""Online matrix factorisation on implicit feedback, with the item factors kept as one numpy
matrix so a whole catalogue is scored with a single matrix-vector product.

Why not river's ``reco.FunkMF`` for learning: measured here it costs ~30 us per (user, item)
update, and implicit feedback needs one update per sampled negative as well; this numpy SGD
does the positive and its negatives in one vectorised step (~10 us), on the same equation
(``<v_u, v_i>``, squared loss, L2). See docs/benchmarks.md.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt

from stream.core.models import _kernels as _k
from stream.core.models._state import (
    decode_strings,
    encode_strings,
    get_array,
    get_field,
    unique_ids,
)
from stream.core.models._vocab import (
    EvictionPlan,
    EvictionSteps,
    Vocabulary,
    VocabularyModel,
    drain,
    grow_rows,
    top_rows,
)
from stream.core.models.base import FloatArray, Interaction, check_fraction, check_positive
from stream.core.shards import MASK as SHARD_MASK
from stream.core.shards import ShardedLRU

Float32Array = npt.NDArray[np.float32]

#: uniform draws are made this many at a time (numpy's per-call overhead dominates one)
_DRAW_BATCH = 4096
_U128 = 1 << 128


class ImplicitMF(VocabularyModel):
    """Matrix factorisation learned one play at a time from implicit feedback.

    A full play is a positive (target 1), a skip has target ``skip_target``; each play also
    draws ``n_negatives`` target-0 tracks, uniformly from the catalogue (default) or, with
    ``uniform_negatives=False``, from recent plays (popularity-weighted). Measured on the
    MovieLens-100K replay: uniform 0.085 HR@10 alone, popularity-weighted 0.036 -- the latter
    teaches the factors to push popular tracks down. Users with no factors yet -- new or
    only seen elsewhere -- get the mean factor of their recent tracks.

    >>> mf = ImplicitMF(n_factors=4, seed=1)
    >>> for i in range(50):
    ...     mf.learn_one(Interaction("u", "ab"[i % 2], i))
    >>> sorted(mf.candidates(Interaction("u"), 2))
    ['a', 'b']

    ``max_users`` bounds the listeners with factors: past it, the one who played least
    recently loses theirs (and is treated as new when they come back). ``None``: no bound.
    """

    #: default for snapshots taken before the setting existed
    max_users: int | None = None

    def __init__(
        self,
        n_factors: int = 32,
        learning_rate: float = 0.1,
        l2: float = 0.01,
        n_negatives: int = 2,
        skip_target: float = 0.0,
        init_scale: float = 0.1,
        negative_pool: int = 10_000,
        uniform_negatives: bool = True,
        vocabulary: Vocabulary | None = None,
        seed: int = 0,
        max_users: int | None = None,
    ) -> None:
        if n_factors < 1:
            raise ValueError(f"n_factors must be >= 1, got {n_factors!r}")
        check_positive("learning_rate", learning_rate)
        check_positive("l2", l2, allow_zero=True)
        check_positive("init_scale", init_scale)
        check_fraction("skip_target", skip_target, allow_zero=True)
        if n_negatives < 0:
            raise ValueError(f"n_negatives must be >= 0, got {n_negatives!r}")
        if negative_pool < 1:
            raise ValueError(f"negative_pool must be >= 1, got {negative_pool!r}")
        if max_users is not None and max_users < 1:
            raise ValueError(f"max_users must be >= 1 or None, got {max_users!r}")
        self.n_factors = n_factors
        self.learning_rate = learning_rate
        self.l2 = l2
        self.n_negatives = n_negatives
        self.skip_target = skip_target
        self.init_scale = init_scale
        self.negative_pool = negative_pool
        self.uniform_negatives = uniform_negatives
        self.vocabulary = vocabulary
        self.seed = seed
        self.max_users = max_users
        self._rng = np.random.default_rng(seed)
        self._vocab = vocabulary if vocabulary is not None else Vocabulary()
        self._known = 0  # rows of item_factors initialised so far
        # float32: the item side is the memory that grows with the catalogue (P3 target:
        # within 1.5x of a dense float32 matrix, so capacity grows by 1/8, not doubling)
        self.item_factors: Float32Array = np.zeros((0, n_factors), dtype=np.float32)
        #: listener -> factors, least recently learned first (the LRU order of max_users)
        #: (in shards: stream.core.shards)
        self.user_factors: ShardedLRU[str, Float32Array] = ShardedLRU()
        self.users_evicted = 0
        self._pool: list[int] = []
        self._draws: list[float] = []
        self._draw_pos = 0
        #: learn_step's targets per (rows, target): (target, 0, 0, ...), read-only use
        self._targets: dict[tuple[int, float], FloatArray] = {}
        self._pool_pos = 0

    # -- checkpoints ----------------------------------------------------------------------

    _PARAMS: dict[str, Any] = {
        "n_factors": int, "learning_rate": float, "l2": float, "n_negatives": int,
        "skip_target": float, "init_scale": float, "negative_pool": int,
        "uniform_negatives": bool, "seed": int, "max_users": (int, type(None)),
    }
    _WHERE = "mf"

    def export_state(
        self, users: bool = True
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The model's state: parameters, :meth:`_export_fields` (without the listeners'
        factors when ``users=False``: the worker keeps them with each listener's session),
        vocabulary."""
        return self._with_params(*self._export_fields(users))

    def _export_fields(
        self, users: bool = True
    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Item factors, the listeners' factors (one matrix and their ids), the negative
        pool and the random generator's exact position (so a restored model draws the same
        negatives)."""
        ids = list(self.user_factors) if users else []
        matrix = (np.stack([self.user_factors[u] for u in ids]) if ids
                 else np.zeros((0, self.n_factors), dtype=np.float32))
        blob, ends = encode_strings(ids)
        rng = self._rng.bit_generator.state
        fields: dict[str, Any] = {
            "known": self._known,
            "rng": {"bit_generator": rng["bit_generator"], "state": int(rng["state"]["state"]),
                    "inc": int(rng["state"]["inc"]), "has_uint32": int(rng["has_uint32"]),
                    "uinteger": int(rng["uinteger"])},
            "draw_pos": self._draw_pos,
            "pool_pos": self._pool_pos,
            "users_evicted": self.users_evicted,
        }
        arrays: dict[str, np.ndarray] = {
            "item_factors": self.item_factors[: self._known].copy(),
            "user_factors": matrix.astype(np.float32),
            "user_ids.bytes": blob,
            "user_ids.ends": ends,
            "pool": np.array(self._pool, dtype=np.int64),
            "draws": np.array(self._draws, dtype=np.float64),
        }
        return fields, arrays

    def _import_fields(
        self, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray], where: str
    ) -> None:
        """Pool rows index the item factors in a compiled kernel, unchecked: all are checked."""
        array = partial(get_array, arrays, where=where)
        k = self.n_factors
        known = get_field(manifest, "known", int, where=where, lo=0, hi=len(self._vocab))
        items = array("item_factors", np.float32, shape=(known, k), finite=True)
        users = array("user_factors", np.float32, shape=(None, k), finite=True)
        ids = unique_ids(f"{where}.user_ids", decode_strings(
            f"{where}.user_ids", _need(arrays, "user_ids.bytes", where),
            _need(arrays, "user_ids.ends", where)))
        if len(ids) != len(users):
            raise ValueError(f"{where}.user_ids: {len(ids)} ids for {len(users)} factor rows")
        pool = array("pool", np.int64, ndim=1, lo=0, hi=known - 1)
        if len(pool) > self.negative_pool:
            raise ValueError(f"{where}.pool: {len(pool)} rows, negative_pool is "
                             f"{self.negative_pool}")
        draws = array("draws", np.float64, ndim=1, finite=True, lo=0.0, hi=1.0)
        if len(draws) and float(draws.max()) >= 1.0:
            raise ValueError(f"{where}.draws: values must be below 1.0")
        if len(draws) > _DRAW_BATCH:
            raise ValueError(f"{where}.draws: {len(draws)} draws, at most {_DRAW_BATCH}")
        draw_pos = get_field(manifest, "draw_pos", int, where=where, lo=0, hi=len(draws))
        pool_pos = get_field(manifest, "pool_pos", int, where=where, lo=0,
                             hi=max(self.negative_pool - 1, 0))
        self._rng = _generator(get_field(manifest, "rng", dict, where=where), f"{where}.rng")
        self.item_factors = items.copy()
        self._known = known
        # one row array per listener, as learn_one makes them (updated in place)
        self.user_factors = ShardedLRU((u, users[i].copy()) for i, u in enumerate(ids))
        self.users_evicted = get_field(manifest, "users_evicted", int, where=where, lo=0)
        if self.max_users is not None and len(ids) > self.max_users:
            raise ValueError(f"{where}.user_ids: {len(ids)} listeners, max_users is "
                             f"{self.max_users}")
        self._pool = pool.tolist()
        self._pool_pos = pool_pos
        self._draws = draws.tolist()
        self._draw_pos = draw_pos

    # -- learning -------------------------------------------------------------------------

    def _item_row(self, track_id: str) -> int:
        row = self._vocab.add(track_id)
        if len(self._vocab) > self._known:
            self._sync()
        return row

    def _sync(self) -> None:
        """Give factors to rows the (possibly shared) vocabulary gained since last time."""
        size = len(self._vocab)
        if size > self._known:
            self.item_factors = grow_rows(self.item_factors, size, growth=1.125)
            fresh = self._rng.normal(0.0, self.init_scale, (size - self._known, self.n_factors))
            self.item_factors[self._known : size] = fresh
            self._known = size

    def learn_one(self, x: Interaction) -> None:
        self.learn_step(x)

    def learn_step(self, x: Interaction, *, keep_before: bool = True
                   ) -> tuple[Float32Array | None, list[int]]:
        """:meth:`learn_one`, returning what another worker needs to take the same item
        step (:meth:`apply_item_step`): the listener's factors before the step (a copy;
        None with ``keep_before`` off) and the rows stepped (the played track first, then
        the sampled negatives)."""
        row = self._item_row(x.track_id)
        users = self.user_factors
        h = hash(x.user_id) & SHARD_MASK  # users.get and users.move_to_end, inlined
        shard = users.shards[h]
        user = shard.get(x.user_id)
        if user is None:
            user = self._rng.normal(0.0, self.init_scale, self.n_factors).astype(np.float32)
            if users.touch(x.user_id, user, self.max_users or 0) is not None:
                self.users_evicted += 1
        else:
            shard.move_to_end(x.user_id)
            users.stamps[h][x.user_id] = users.next_stamp()
        target = self.skip_target if x.skipped else 1.0
        # the row, then the distinct sampled negatives other than it, in draw order (one
        # update per row in mf_step); draws come from the seeded batch, in the same order
        picked = [row]
        size = len(self._vocab)
        if self.uniform_negatives and size > 1:
            for _ in range(self.n_negatives):
                r = int(self._uniform() * size)
                if r not in picked:
                    picked.append(r)
        elif self._pool:
            pool = self._pool
            for _ in range(self.n_negatives):
                r = pool[int(self._uniform() * len(pool))]
                if r not in picked:
                    picked.append(r)
        rows = np.array(picked, dtype=np.int64)
        targets = self._targets.get((len(picked), target))
        if targets is None:  # (target, 0, 0, ...): mf_step only reads it
            targets = np.zeros(len(picked))
            targets[0] = target
            self._targets[(len(picked), target)] = targets
        before = user.copy() if keep_before else None
        _k.mf_step(self.item_factors, user, rows, targets, self.learning_rate, self.l2)
        if not x.skipped:
            self._remember(row)
        return before, picked

    def apply_item_step(
        self, user: Float32Array, track_id: str, negatives: Sequence[str], skipped: bool
    ) -> None:
        """Take the item side of another worker's step: the same SGD update of the played
        track's and the sampled negatives' factors, from the listener's factors as that
        worker had them before its step (``user``, left unchanged). The listener's own
        factors stay with their owner (:mod:`stream.listener_record`)."""
        if user.shape != (self.n_factors,):
            raise ValueError(f"user: shape {user.shape}, expected ({self.n_factors},)")
        row = self._item_row(track_id)
        picked = [row]
        for t in negatives:
            r = self._item_row(t)
            if r not in picked:
                picked.append(r)
        targets = np.zeros(len(picked))
        targets[0] = self.skip_target if skipped else 1.0
        _k.mf_step(self.item_factors, user.astype(np.float32, copy=True),
                   np.array(picked, dtype=np.int64), targets, self.learning_rate, self.l2)
        if not skipped:
            self._remember(row)

    def export_user(self, user_id: str) -> Float32Array | None:
        """The listener's factors (the array itself: copy before keeping), or None."""
        return self.user_factors.shards[hash(user_id) & SHARD_MASK].get(user_id)

    def import_user(self, user_id: str, factors: Float32Array) -> None:
        """Give a listener these factors (e.g. restored with their session after a
        rebalance); they become the most recently learned (``max_users`` applies)."""
        vec = np.asarray(factors, dtype=np.float32)
        if vec.shape != (self.n_factors,) or not np.all(np.isfinite(vec)):
            raise ValueError(f"factors: need {self.n_factors} finite values")
        if self.user_factors.touch(user_id, vec.copy(), self.max_users or 0) is not None:
            self.users_evicted += 1

    def _uniform(self) -> float:
        # numpy's per-call overhead dominates one draw; draw in seeded batches instead.
        if self._draw_pos >= len(self._draws):
            self._draws = self._rng.random(_DRAW_BATCH).tolist()
            self._draw_pos = 0
        value = self._draws[self._draw_pos]
        self._draw_pos += 1
        return value

    def _remember(self, row: int) -> None:
        if len(self._pool) < self.negative_pool:
            self._pool.append(row)
        else:
            self._pool[self._pool_pos] = row
            self._pool_pos = (self._pool_pos + 1) % self.negative_pool

    def limit_users(self, max_users: int | None) -> int:
        """Set ``max_users`` and drop the least recently learned listeners above it now;
        returns how many were dropped."""
        if max_users is not None and max_users < 1:
            raise ValueError(f"max_users must be >= 1 or None, got {max_users!r}")
        self.max_users = max_users
        dropped = 0
        while max_users is not None and len(self.user_factors) > max_users:
            self.user_factors.popitem(last=False)
            dropped += 1
        self.users_evicted += dropped
        return dropped

    def forget_user(self, user_id: str) -> bool:
        """Drop the listener's factors (right to be forgotten); True if there were any."""
        return self.user_factors.pop(user_id, None) is not None

    # -- scoring --------------------------------------------------------------------------

    def user_vector(self, x: Interaction) -> Float32Array | None:
        """The listener's factors, or the mean factors of their recent tracks, or None."""
        user = self.user_factors.shards[hash(x.user_id) & SHARD_MASK].get(x.user_id)
        if user is not None:
            return user
        rows = [r for r in self._vocab.rows(x.history).tolist() if 0 <= r < self._known]
        if not rows:
            return None
        vec: Float32Array = self.item_factors[rows].mean(axis=0)
        return vec

    def evict_rows(self, plan: EvictionPlan) -> None:
        """Apply a catalogue eviction (see :class:`~stream.core.models._vocab.EvictionPlan`;
        called before the vocabulary applies it): movers' factors move into the holes, rows
        from ``keep`` on get fresh factors when reused. O(evicted)."""
        drain(self.evict_steps(plan))

    def evict_steps(self, plan: EvictionPlan) -> EvictionSteps[None]:
        """:meth:`evict_rows` in steps (:data:`~stream.core.models._vocab.EvictionSteps`)
        of 4,096 rows: numpy's gather holds the GIL."""
        self._sync()  # every row has factors before rows move
        yield None
        factors = self.item_factors
        for lo in range(0, len(plan.holes), 4096):
            factors[plan.holes[lo : lo + 4096]] = factors[plan.movers[lo : lo + 4096]]
            yield None
        self._known = min(self._known, plan.keep)
        if self._pool:
            pool = np.array(self._pool, dtype=np.int64)
            pool = plan.remap[pool[pool < len(plan.remap)]]
            self._pool = pool[pool >= 0].tolist()
        self._pool_pos = self._pool_pos % max(len(self._pool), 1)

    def predict_one(self, x: Interaction) -> float:
        row = self._vocab.index.shards[hash(x.track_id) & SHARD_MASK].get(x.track_id)
        user = self.user_vector(x)
        if row is None or row >= self._known or user is None:
            return 0.0
        return float(self.item_factors[row] @ user)

    def factors(self) -> Float32Array:
        """The item factor matrix, one row per vocabulary row (at least)."""
        self._sync()
        return self.item_factors

    def score_all(self, x: Interaction) -> FloatArray | None:
        """Predicted preference for every known track (vocabulary rows), or None when the
        listener has neither factors nor known recent tracks."""
        user = self.user_vector(x)
        if user is None:
            return None
        self._sync()
        out: FloatArray = (self.item_factors[: len(self._vocab)] @ user).astype(np.float64)
        return out

    def score_many(self, x: Interaction, track_ids: Sequence[str]) -> FloatArray:
        rows = self._vocab.rows(track_ids)
        scores = self.score_all(x)
        if scores is None or not len(scores):
            return np.zeros(len(rows))
        return np.where(rows >= 0, scores[np.maximum(rows, 0)], 0.0)

    def candidates(
        self, x: Interaction, n: int, exclude: Collection[str] = frozenset()
    ) -> dict[str, float]:
        """The ``n`` tracks with the highest predicted preference, excluding ``exclude``."""
        scores = self.score_all(x)
        if scores is None:
            return {}
        scores[self._vocab.known_rows(exclude)] = -np.inf
        ids = self._vocab.ids
        return {ids[r]: float(scores[r]) for r in top_rows(scores, n).tolist()}

    def item_norms(self) -> FloatArray:
        """The L2 norm of every known track's factors (plus 1e-12), for :meth:`similar_all`."""
        self._sync()
        out: FloatArray = np.linalg.norm(self.item_factors[: len(self._vocab)], axis=1) + 1e-12
        return out

    def similar_all(
        self, track_id: str, norms: npt.NDArray[np.floating[Any]] | None = None
    ) -> FloatArray | None:
        """Cosine similarity of every known track's factors to ``track_id``'s, or None.
        ``norms`` (from :meth:`item_norms`, same model state) saves recomputing them."""
        row = self._vocab.index.get(track_id)
        if row is None:
            return None
        self._sync()
        matrix = self.item_factors[: len(self._vocab)]
        if norms is None or len(norms) != len(matrix):
            norms = self.item_norms()
        out: FloatArray = (matrix @ matrix[row]) / (norms * norms[row])
        out[row] = -np.inf
        return out

    def similar(self, track_id: str, n: int) -> dict[str, float]:
        """The ``n`` tracks whose factors point the same way as ``track_id``'s."""
        scores = self.similar_all(track_id)
        if scores is None:
            return {}
        ids = self._vocab.ids
        return {ids[r]: float(scores[r]) for r in top_rows(scores, n).tolist()}


def _need(arrays: Mapping[str, np.ndarray], name: str, where: str) -> np.ndarray:
    if name not in arrays:
        raise ValueError(f"{where}.{name}: missing array")
    return arrays[name]


def _generator(state: Mapping[str, Any], where: str) -> np.random.Generator:
    """A PCG64 generator at exactly the exported position."""
    kind = get_field(state, "bit_generator", str, where=where)
    if kind != "PCG64":
        raise ValueError(f"{where}.bit_generator: {kind!r}, expected 'PCG64'")
    bits = np.random.PCG64()
    bits.state = {
        "bit_generator": "PCG64",
        "state": {"state": get_field(state, "state", int, where=where, lo=0, hi=_U128 - 1),
                  "inc": get_field(state, "inc", int, where=where, lo=0, hi=_U128 - 1)},
        "has_uint32": get_field(state, "has_uint32", int, where=where, lo=0, hi=1),
        "uinteger": get_field(state, "uinteger", int, where=where, lo=0, hi=(1 << 32) - 1),
    }
    return np.random.Generator(bits)
