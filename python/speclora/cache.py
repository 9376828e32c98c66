"""Caches that speculative decoding can roll back, for every layer type mlx-lm builds.

A speculative round feeds a model tokens that may then be rejected; afterwards
each layer's cache must hold exactly what it would hold had only the accepted
tokens been fed. How, by layer type:

* ``KVCache``, ``QuantizedKVCache`` (mlx-lm's ``kv_bits``) and the other
  trimmable KV caches: ``trim``, an O(1) move of the offset, used as is.
* Sliding-window layers (mlx-lm's ``RotatingKVCache``, any ``keep``) and full
  attention bounded by ``max_kv_size``: :class:`RollbackKVCache`. mlx-lm's
  rotating cache cannot roll back once it has wrapped (``is_trimmable()`` turns
  False at ``offset >= max_size``: a write has overwritten what a rollback would
  need) and its multi-token update path mis-evicts. :class:`RollbackKVCache` also
  rolls each row of a batch back by its own amount.
* Recurrent state (``ArraysCache``: Mamba, and the recurrent layers of hybrid
  models) cannot be trimmed at all. :class:`CacheRewinder` keeps a checkpoint of
  it from before the speculative tokens and, on rejection, restores it and feeds
  the accepted tokens through the model again (in the same lazy graph as the next
  round, so no extra synchronisation).

:func:`make_speculative_cache` builds these from a model's own ``make_cache()``.
:class:`RollbackKVCache` buffers hold ``headroom`` slots beyond the window, so a
block of up to ``headroom + 1`` tokens is written in place (the ``kv_ring_write``
op) without evicting anything a query of the block can still see, and rolling
back up to ``headroom + 1`` tokens behind the furthest write is an O(1) move of
per-row positions: nothing needs restoring because nothing still needed was
overwritten. Attention masks follow from the absolute position each slot holds,
so the attention is exactly the windowed attention of a full recompute, i.e. of
mlx-lm's ``RotatingKVCache`` fed one token at a time. Longer blocks (a prefill
chunk) take a concatenating path, like mlx-lm's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache
from mlx import nn
from mlx.utils import tree_map
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    ChunkedKVCache,
    ConcatenateKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    _BaseCache,
)

from speclora._native import extension, on_cpu, resolve_stream

DEFAULT_HEADROOM = 32
"""Extra slots of a windowed cache: the longest rollback is ``headroom + 1``."""

SINK_TOKENS = 4
"""Leading tokens a ``max_kv_size`` window always keeps, as mlx-lm's
``make_prompt_cache`` does (``RotatingKVCache(max_kv_size, keep=4)``)."""


def kv_ring_write_reference(
    cache: mx.array,  # [B, H, L, D]
    update: mx.array,  # [B, H, S, D]
    start: mx.array,  # [B] int
    *,
    keep: int,
    capacity: int,
) -> mx.array:
    """``kv_ring_write`` as a composition of MLX ops (same results).

    Args:
        cache (mx.array): ``[B, H, L, D]`` buffer.
        update (mx.array): ``[B, H, S, D]`` new entries.
        start (mx.array): ``[B]`` position of ``update[:, :, 0]`` per row.
        keep (int): Leading slots that never rotate.
        capacity (int): Slots of the full ring; ``0`` for no rotation.

    Returns:
        mx.array: The buffer after the write.
    """
    B, H, L, D = cache.shape
    S = update.shape[2]
    # int64, as the kernel: a position beyond int32 must not wrap into the buffer,
    # and uint64 values past the int64 range saturate rather than turn negative.
    if start.dtype == mx.uint64:
        start = mx.minimum(start, mx.array(2**63 - 1, mx.uint64))
    first = start.astype(mx.int64)[:, None]
    index = mx.arange(S)[None]
    # Past int64 the sum wraps negative and is skipped, as the kernel skips it.
    position = first + index  # [B, S]
    if capacity:
        ring = capacity - keep
        slot = mx.where(position < keep, position, keep + (position - keep) % ring)
        # A later position of the same call lands on the same slot: it wins
        # (if that position exists, i.e. does not pass int64).
        superseded = (
            (position >= keep) & (index + ring < S) & (position <= 2**63 - 1 - ring)
        )
    else:
        slot = position
        superseded = mx.zeros(position.shape, mx.bool_)
    skip = (position < 0) | (slot >= L) | superseded
    # Skipped entries go to one scratch slot past the end, sliced off below.
    slot = mx.where(skip, L, slot)[:, None, :, None]
    padded = mx.concatenate([cache, mx.zeros((B, H, 1, D), cache.dtype)], axis=2)
    written = mx.put_along_axis(
        padded, mx.broadcast_to(slot, update.shape), update.astype(cache.dtype), axis=2
    )
    return written[:, :, :L]


def kv_ring_write(
    cache: mx.array,  # [B, H, L, D]
    update: mx.array,  # [B, H, S, D]
    start: mx.array,  # [B] int
    *,
    keep: int,
    capacity: int,
    stream: mx.Stream | mx.Device | mx.DeviceType | None = None,
) -> mx.array:
    """Write ``update[b, :, i]`` into the slot of position ``start[b] + i``.

    Slots: position ``p`` sits in slot ``p`` if ``capacity == 0`` or ``p < keep``,
    else in ``keep + (p - keep) % (capacity - keep)``. When one call writes more
    positions than the rotating part holds, the later one wins; positions below 0
    or past the buffer are skipped. On a CPU stream the C++ op writes in place
    when MLX can donate the buffer; elsewhere :func:`kv_ring_write_reference` runs.

    Args:
        cache (mx.array): ``[B, H, L, D]`` buffer.
        update (mx.array): ``[B, H, S, D]`` new entries.
        start (mx.array): ``[B]`` position of ``update[:, :, 0]`` per row.
        keep (int): Leading slots that never rotate.
        capacity (int): Slots of the full ring; ``0`` for no rotation.
        stream (mx.Stream or mx.Device, optional): Where to run. Default: ``None``.

    Returns:
        mx.array: The buffer after the write, ``[B, H, L, D]``.

    Raises:
        ValueError: on bad ranks, shapes, dtypes, ``keep`` or ``capacity``.
    """
    for name, value in (("cache", cache), ("update", update), ("start", start)):
        if not isinstance(value, mx.array):
            raise ValueError(
                f"[kv_ring_write] {name} must be an mx.array, got {type(value).__name__}."
            )
    for name, number in (("keep", keep), ("capacity", capacity)):
        # The op keeps them as C int.
        if (
            isinstance(number, bool)
            or not isinstance(number, int)
            or not -(2**31) <= number < 2**31
        ):
            raise ValueError(
                f"[kv_ring_write] {name} must be a 32-bit int, got {number!r}."
            )
    s = resolve_stream(stream)
    if on_cpu(s):
        result: mx.array = extension().kv_ring_write(
            cache, update, start, keep=keep, capacity=capacity, stream=s
        )
        return result
    with mx.stream(s):
        return kv_ring_write_reference(
            cache, update, start, keep=keep, capacity=capacity
        )


def _counts(n: mx.array | Sequence[int]) -> list[int]:
    """Per-row counts on the host."""
    values = n.tolist() if isinstance(n, mx.array) else list(n)
    return [int(c) for c in cast(list[int], values)]


class RollbackKVCache(_BaseCache):
    """A KV cache with per-row positions that rolls back in every state.

    With ``max_size`` it is a sliding-window cache and a drop-in for mlx-lm's
    ``RotatingKVCache``: each query attends to the ``keep`` first tokens and the
    last ``max_size - keep`` tokens up to itself. Without, it grows like
    ``KVCache``; use it over ``KVCache`` only to roll rows back by different
    amounts (:meth:`trim_per_row`).

    While every row is at the same position, :attr:`offset` is an ``int``, as in
    mlx-lm; after rows diverge it is an ``mx.array [B]`` (RoPE takes either).

    ``state`` carries everything (buffers, positions, window), so mlx-lm's
    ``save_prompt_cache`` / ``load_prompt_cache`` round-trip it; importing this
    module registers the class where ``load_prompt_cache`` looks classes up.

    Args:
        max_size (int, optional): Window length. Default: ``None`` (no window).
        keep (int): Leading tokens that stay visible (attention sinks); only
          with ``max_size``. Default: ``0``.
        headroom (int): Extra slots beyond the window; blocks of up to
          ``headroom + 1`` tokens are written in place and rollbacks of up to
          ``headroom + 1`` tokens are always possible. Default:
          :data:`DEFAULT_HEADROOM`.
    """

    step = 256

    def __init__(
        self,
        max_size: int | None = None,
        keep: int = 0,
        *,
        headroom: int = DEFAULT_HEADROOM,
    ) -> None:
        if max_size is not None and max_size < 1:
            raise ValueError(
                f"[RollbackKVCache] max_size must be >= 1, got {max_size}."
            )
        if keep < 0 or (max_size is not None and keep >= max_size):
            raise ValueError(
                f"[RollbackKVCache] keep must be in [0, max_size), got {keep} "
                f"(max_size={max_size})."
            )
        if max_size is None and keep:
            raise ValueError("[RollbackKVCache] keep needs a window (max_size).")
        if headroom < 0:
            raise ValueError(
                f"[RollbackKVCache] headroom must be >= 0, got {headroom}."
            )
        self.max_size = max_size
        self.keep = keep
        self.headroom = headroom
        self.keys: mx.array | None = None  # [B, H, L, D]
        self.values: mx.array | None = None  # [B, H, L, Dv]
        self._pos: list[int] = []  # per row: position of the next token
        self._frontier: list[int] = []  # per row: furthest position written + 1

    # ------------------------------------------------------------ positions

    @property
    def capacity(self) -> int:
        """Slots of the full ring (``max_size + headroom``); 0 without a window."""
        return 0 if self.max_size is None else self.max_size + self.headroom

    @property
    def offset(self) -> int | mx.array:
        """Position of the next token: an ``int`` while rows agree, else ``[B]``."""
        if not self._pos:
            return 0
        if self._uniform():
            return self._pos[0]
        return mx.array(self._pos, mx.int32)

    @property
    def offsets(self) -> list[int]:
        """Position of the next token of each row (empty before the first update)."""
        return list(self._pos)

    def _uniform(self) -> bool:
        return all(p == self._pos[0] for p in self._pos)

    def _rows(self) -> tuple[list[int], list[int]]:
        """Per-row positions and frontiers; one row at 0 before the first update."""
        return (self._pos, self._frontier) if self._pos else ([0], [0])

    def _in_place(self, n: int) -> bool:
        return self.max_size is None or n <= self.headroom + 1

    def _wrapped(self, n: int) -> bool:
        """Whether, once an ``n``-token block is written in place (``n = 0``: as
        things stand), some slot may hold a position other than its own index."""
        if self.max_size is None:
            return False
        pos, frontier = self._rows()
        return max(max(f, p + n) for f, p in zip(frontier, pos)) > self.capacity

    def _visible_slots(self, n: int) -> int:
        """How many leading buffer slots the fetch of an ``n``-token block returns."""
        written = n if self._in_place(n) else 0
        if self._wrapped(written):
            return self.capacity
        return max(self._rows()[0]) + written

    # --------------------------------------------------------------- update

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, H, _, Dk = keys.shape
        Dv = values.shape[3]
        have = 0 if self.keys is None else self.keys.shape[2]
        if needed <= have:
            return
        size = -(-needed // self.step) * self.step
        if self.max_size is not None:
            size = min(size, self.capacity)
        new_k = mx.zeros((B, H, size - have, Dk), keys.dtype)
        new_v = mx.zeros((B, H, size - have, Dv), values.dtype)
        if self.keys is None or self.values is None:
            self.keys, self.values = new_k, new_v
        else:
            self.keys = mx.concatenate([self.keys, new_k], axis=2)
            self.values = mx.concatenate([self.values, new_v], axis=2)

    def update_and_fetch(
        self,
        keys: mx.array,  # [B, H, S, D]
        values: mx.array,  # [B, H, S, Dv]
    ) -> tuple[mx.array, mx.array]:
        """Append ``S`` tokens per row and return what attention reads.

        Args:
            keys (mx.array): ``[B, H, S, D]`` new keys.
            values (mx.array): ``[B, H, S, Dv]`` new values.

        Returns:
            tuple[mx.array, mx.array]: keys and values to attend to, slots in
            buffer order; :meth:`make_mask` describes which each query sees.
        """
        B, _, S, _ = keys.shape
        if not self._pos:
            self._pos, self._frontier = [0] * B, [0] * B
        elif len(self._pos) != B:
            raise ValueError(
                f"[RollbackKVCache] the cache holds {len(self._pos)} rows, got keys "
                f"for {B}."
            )
        in_place = self._in_place(S)
        visible = self._visible_slots(S)
        furthest = max(p + S for p in self._pos)
        needed = furthest if self.max_size is None else min(furthest, self.capacity)
        self._grow(keys, values, needed)
        assert self.keys is not None and self.values is not None
        start = mx.array(self._pos, mx.int32)
        if in_place:
            self.keys = kv_ring_write(
                self.keys, keys, start, keep=self.keep, capacity=self.capacity
            )
            self.values = kv_ring_write(
                self.values, values, start, keep=self.keep, capacity=self.capacity
            )
            out_k, out_v = self.keys, self.values
            if visible < out_k.shape[2]:
                out_k, out_v = out_k[..., :visible, :], out_v[..., :visible, :]
        else:
            out_k = mx.concatenate([self.keys[..., :visible, :], keys], axis=2)
            out_v = mx.concatenate([self.values[..., :visible, :], values], axis=2)
            self.keys = kv_ring_write(
                self.keys, keys, start, keep=self.keep, capacity=self.capacity
            )
            self.values = kv_ring_write(
                self.values, values, start, keep=self.keep, capacity=self.capacity
            )
        self._frontier = [max(f, p + S) for f, p in zip(self._frontier, self._pos)]
        self._pos = [p + S for p in self._pos]
        return out_k, out_v

    # ----------------------------------------------------------------- mask

    def _slot_positions(self, top: mx.array, length: int) -> tuple[mx.array, mx.array]:
        """Position held by each of the first ``length`` slots, for rows whose
        latest position is ``top [R, 1]``; and whether it holds one at all."""
        slot = mx.arange(length)[None]  # [1, L]
        if self.max_size is None:
            return mx.broadcast_to(slot, (top.shape[0], length)), slot <= top
        ring = self.capacity - self.keep
        top_slot = mx.where(top < self.keep, top, self.keep + (top - self.keep) % ring)
        rotated = top - (top_slot - slot) % ring
        position = mx.where(slot < self.keep, slot, rotated)
        held = (position >= 0) & (position <= top)
        held = held & ((slot < self.keep) | (position >= self.keep))
        return position, held

    def make_mask(
        self,
        N: int,
        window_size: int | None = None,
        return_array: bool = False,
    ) -> mx.array | str | None:
        """The attention mask for the next ``N``-token update.

        Args:
            N (int): Tokens in the block about to be written.
            window_size (int, optional): The model's sliding window, if any.
              Default: ``None`` (the cache's ``max_size``).
            return_array (bool): Always return a boolean array. Default: ``False``.

        Returns:
            ``None`` or ``"causal"`` where plain causal attention is exact, else a
            boolean mask ``[R, 1, N, L]`` (``R`` is 1 while rows agree, else ``B``).
        """
        span = self.max_size
        if window_size is not None:
            span = window_size if span is None else min(span, window_size)
        rows = self._pos or [0]
        uniform = all(p == rows[0] for p in rows)
        in_place = self._in_place(N)
        if (
            uniform
            and not return_array
            and not self._wrapped(N if in_place else 0)
            and (span is None or rows[0] + N <= span)
        ):
            return None if N == 1 else "causal"

        first = mx.array(rows[:1] if uniform else rows, mx.int32)[:, None]  # [R, 1]
        query = first + mx.arange(N)[None]  # [R, N]
        visible = self._visible_slots(N)
        if in_place:
            position, held = self._slot_positions(first + N - 1, visible)
        else:
            old, old_held = self._slot_positions(first - 1, visible)
            new = mx.broadcast_to(first + mx.arange(N)[None], (first.shape[0], N))
            position = mx.concatenate([old, new], axis=1)
            held = mx.concatenate([old_held, mx.ones(new.shape, mx.bool_)], axis=1)
        position, held = position[:, None, :], held[:, None, :]  # [R, 1, L]
        query = query[:, :, None]  # [R, N, 1]
        mask = held & (position <= query)
        if span is not None:
            keep = self.keep if self.max_size is not None else 0
            mask = mask & ((position < keep) | (query - position < span - keep))
        return mask[:, None]

    # ------------------------------------------------------------- rollback

    def _deepest(self, row: int) -> int:
        """The earliest position ``row`` can roll back to.

        Until a write lands on a slot that held an older position, every position
        is still there. After, a rollback to ``t`` needs the ``max_size - keep``
        positions before ``t`` intact: they are, for ``t`` at most ``headroom + 1``
        behind the furthest write.
        """
        frontier = self._frontier[row]
        if self.max_size is None or frontier <= self.capacity:
            return 0
        return max(0, frontier - (self.headroom + 1))

    def trim(self, n: int) -> int:
        """Roll every row back by ``n`` tokens, or as far as it can.

        As mlx-lm's caches do: what can be trimmed is trimmed and the count is
        returned. A row goes back at most to its first position and, once its
        window has wrapped, at most ``headroom + 1`` tokens behind its furthest
        write.

        Args:
            n (int): Tokens to drop from the end.

        Returns:
            int: Tokens dropped from the row that dropped the most.

        Raises:
            ValueError: if ``n < 0``.
        """
        if n < 0:
            raise ValueError(f"[RollbackKVCache] cannot trim a negative count {n}.")
        return max(self.trim_per_row([n] * len(self._pos)), default=0)

    def trim_per_row(self, n: mx.array | Sequence[int]) -> list[int]:
        """Roll row ``b`` back by ``n[b]`` tokens, or as far as it can (see :meth:`trim`).

        Args:
            n (mx.array or Sequence[int]): ``[B]`` non-negative counts. An array is
              read on the host.

        Returns:
            list[int]: Tokens dropped from each row.

        Raises:
            ValueError: on a count that is negative or a length other than ``B``.
        """
        counts = _counts(n)
        if len(counts) != len(self._pos) and self._pos:
            raise ValueError(
                f"[RollbackKVCache] got {len(counts)} counts for {len(self._pos)} rows."
            )
        if any(c < 0 for c in counts):
            raise ValueError(f"[RollbackKVCache] counts must be >= 0, got {counts}.")
        if not self._pos:
            return [0] * len(counts)
        dropped = [
            max(0, min(c, p - self._deepest(row)))
            for row, (c, p) in enumerate(zip(counts, self._pos))
        ]
        self._pos = [p - d for p, d in zip(self._pos, dropped)]
        return dropped

    def is_trimmable(self) -> bool:
        return True

    # ------------------------------------------------------- bookkeeping API

    def size(self) -> int:
        if not self._pos:
            return 0
        longest = max(self._pos)
        return longest if self.max_size is None else min(longest, self.max_size)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return int(self.keys.nbytes + self.values.nbytes)

    @property
    def state(self) -> tuple[Any, ...]:
        """Buffers, per-row positions and furthest writes (``[B]`` int64, ``None``
        before the first update), ``max_size``, ``keep`` and ``headroom``."""
        rows = bool(self._pos)
        return (
            self.keys,
            self.values,
            mx.array(self._pos, mx.int64) if rows else None,
            mx.array(self._frontier, mx.int64) if rows else None,
            self.max_size,
            self.keep,
            self.headroom,
        )

    @state.setter
    def state(self, v: Sequence[Any]) -> None:
        keys, values, pos, frontier, max_size, keep, headroom = v
        self.keys, self.values = keys, values
        self._pos = [] if pos is None else _counts(pos)
        self._frontier = [] if frontier is None else _counts(frontier)
        self.max_size = None if max_size is None else int(max_size)
        self.keep, self.headroom = int(keep), int(headroom)

    @property
    def meta_state(self) -> tuple[str, ...]:
        # The same facts as ``state``, for mlx-lm versions that save meta_state.
        return (
            "" if self.max_size is None else str(self.max_size),
            str(self.keep),
            str(self.headroom),
            ",".join(map(str, self._pos)),
            ",".join(map(str, self._frontier)),
        )

    @meta_state.setter
    def meta_state(self, v: tuple[str, ...]) -> None:
        max_size, keep, headroom, pos, frontier = v
        self.max_size = int(max_size) if max_size else None
        self.keep, self.headroom = int(keep), int(headroom)
        self._pos = [int(p) for p in pos.split(",")] if pos else []
        self._frontier = [int(f) for f in frontier.split(",")] if frontier else []


def _register_with_mlx_lm() -> None:
    # mlx-lm's load_prompt_cache (and CacheList) find cache classes by name in
    # its cache module and offer no registry, so the class is added there.
    if getattr(mlx_lm_cache, RollbackKVCache.__name__, None) is not RollbackKVCache:
        setattr(mlx_lm_cache, RollbackKVCache.__name__, RollbackKVCache)


_register_with_mlx_lm()


def load_prompt_cache(file_name: str, return_metadata: bool = False) -> Any:
    """mlx-lm's ``load_prompt_cache``, for files that hold :class:`RollbackKVCache` layers.

    mlx-lm's own function reads them too once this module is imported; this one
    is here so that code loading such files says where the class comes from.

    Args:
        file_name (str): The ``.safetensors`` file written by mlx-lm's
          ``save_prompt_cache``.
        return_metadata (bool): Also return the metadata. Default: ``False``.

    Returns:
        list or tuple[list, dict]: The caches (and the metadata).
    """
    _register_with_mlx_lm()
    return mlx_lm_cache.load_prompt_cache(file_name, return_metadata=return_metadata)


# ------------------------------------------------------------------ building


def make_speculative_cache(
    model: nn.Module,
    max_kv_size: int | None = None,
    *,
    per_row: bool = False,
    headroom: int = DEFAULT_HEADROOM,
) -> list[Any]:
    """Caches for ``model`` that speculative decoding can roll back.

    Starts from the model's own ``make_cache()`` (one ``KVCache`` per layer for
    models without one) and gives each layer a cache that rolls back:

    * ``KVCache`` layers keep it (its ``trim`` is an O(1) offset move), or get a
      :class:`RollbackKVCache` without a window if ``per_row``. With
      ``max_kv_size`` they get a :class:`RollbackKVCache` window of that size that
      keeps the first :data:`SINK_TOKENS` tokens, as mlx-lm's
      ``make_prompt_cache`` does for models without their own ``make_cache`` --
      and, unlike it, for models with one (it ignores ``max_kv_size`` there).
    * Sliding-window layers (``RotatingKVCache``) get a :class:`RollbackKVCache`
      of the same window and ``keep``.
    * Recurrent layers (``ArraysCache``) and the other trimmable mlx-lm caches
      keep theirs; :class:`CacheRewinder` rolls recurrent state back.
    * ``CacheList`` layers get each of their caches converted.

    Args:
        model (nn.Module): An mlx-lm model.
        max_kv_size (int, optional): Window of full-attention layers, greater
          than :data:`SINK_TOKENS`. Default: ``None`` (no window).
        per_row (bool): Allow :func:`trim_cache` with a count per row. Default:
          ``False``.
        headroom (int): Rollback depth of windowed layers, see
          :class:`RollbackKVCache`. Default: :data:`DEFAULT_HEADROOM`.

    Returns:
        list: One cache per entry of the model's ``make_cache()``.

    Raises:
        ValueError: if ``max_kv_size <= SINK_TOKENS``, if a layer's cache type
          cannot be rolled back, or with ``per_row`` if a layer holds recurrent
          state (it has one state for all rows' histories).
    """
    if max_kv_size is not None and max_kv_size <= SINK_TOKENS:
        # mlx-lm's RotatingKVCache(max_size <= 4, keep=4) stops storing new tokens.
        raise ValueError(
            f"[make_speculative_cache] max_kv_size must be greater than "
            f"{SINK_TOKENS} (a window keeps its first {SINK_TOKENS} tokens, as "
            f"mlx-lm's does), got {max_kv_size}."
        )
    if hasattr(model, "make_cache"):
        base = model.make_cache()
    else:
        base = [KVCache() for _ in model.layers]
    return [
        _rollback_layer(c, f"layer {i}", max_kv_size, per_row, headroom)
        for i, c in enumerate(base)
    ]


# Caches whose trim rolls back every state they can be in (one offset for all rows).
_TRIMMABLE = (KVCache, QuantizedKVCache, ConcatenateKVCache, ChunkedKVCache)


def _rollback_layer(
    c: Any, where: str, max_kv_size: int | None, per_row: bool, headroom: int
) -> Any:
    """The cache that replaces ``c`` in :func:`make_speculative_cache`."""
    if isinstance(c, CacheList):
        return CacheList(
            *(
                _rollback_layer(x, f"{where}.{j}", max_kv_size, per_row, headroom)
                for j, x in enumerate(c.caches)
            )
        )
    if isinstance(c, RotatingKVCache):
        return RollbackKVCache(c.max_size, c.keep, headroom=headroom)
    if type(c) is KVCache and max_kv_size is not None:
        return RollbackKVCache(max_kv_size, SINK_TOKENS, headroom=headroom)
    if type(c) is KVCache and per_row:
        return RollbackKVCache(headroom=headroom)
    if isinstance(c, ArraysCache) and per_row:
        raise ValueError(
            f"[make_speculative_cache] {where} ({type(c).__name__}) holds recurrent "
            "state, which cannot roll back row by row."
        )
    if isinstance(c, (*_TRIMMABLE, ArraysCache, RollbackKVCache)):
        return c
    raise ValueError(
        f"[make_speculative_cache] {where} uses {type(c).__name__}, which cannot "
        "be rolled back."
    )


def _leaves(cache: Sequence[Any], prefix: str = "layer ") -> Iterator[tuple[str, Any]]:
    """Every layer cache, inside ``CacheList`` layers too, with where it sits."""
    for i, c in enumerate(cache):
        if isinstance(c, CacheList):
            yield from _leaves(c.caches, f"{prefix}{i}.")
        else:
            yield f"{prefix}{i}", c


def prepare_speculative_cache(cache: list[Any]) -> None:
    """Check, before any generation, that every layer of ``cache`` can roll back.

    Empty mlx-lm ``RotatingKVCache`` layers (e.g. from ``make_prompt_cache``) are
    turned, in place, into :class:`RollbackKVCache` of the same window: the
    caller's list keeps the same objects, now able to roll back after wrapping.

    Args:
        cache (list): One model's caches.

    Raises:
        ValueError: naming the first layer whose cache cannot roll back: a
          ``RotatingKVCache`` that already holds tokens, or an unknown type.
    """
    for where, c in _leaves(cache):
        if isinstance(c, RotatingKVCache):
            if not c.empty():
                raise ValueError(
                    f"[speculative decoding] {where} is an mlx-lm RotatingKVCache "
                    "that already holds tokens; it cannot roll back once it wraps. "
                    "Build the caches with speclora.make_speculative_cache."
                )
            max_size, keep = c.max_size, c.keep
            vars(c).clear()
            cast(Any, c).__class__ = RollbackKVCache
            RollbackKVCache.__init__(cast(Any, c), max_size, keep)
        elif not isinstance(c, (*_TRIMMABLE, ArraysCache, RollbackKVCache)):
            raise ValueError(
                f"[speculative decoding] {where} uses {type(c).__name__}, which "
                "cannot be rolled back."
            )


def rollback_limit(cache: Sequence[Any]) -> int | None:
    """The most tokens a speculative round may draft so that ``cache`` rolls back
    in full: the smallest ``headroom`` of its windowed layers (``None``: no bound)."""
    limits = [
        c.headroom
        for _, c in _leaves(cache)
        if isinstance(c, RollbackKVCache) and c.max_size is not None
    ]
    return min(limits) if limits else None


def trim_cache(cache: list[Any], n: int | mx.array | Sequence[int]) -> int | list[int]:
    """Roll every layer's cache back by ``n`` tokens, or row ``b`` by ``n[b]``.

    Follows mlx-lm's ``trim_prompt_cache``: each layer trims what it can and the
    count is returned.

    Args:
        cache (list): Trimmable caches, e.g. from :func:`make_speculative_cache`
          for a model without recurrent layers.
        n (int or mx.array or Sequence[int]): One count, or ``[B]`` counts.

    Returns:
        int or list[int]: Tokens dropped: the least any layer dropped (per row
        for per-row counts).

    Raises:
        ValueError: on negative counts, on a layer that cannot be trimmed
          (recurrent state: see :class:`CacheRewinder`), or on per-row counts that
          differ on a cache whose rows share one position (plain ``KVCache``:
          build the caches with ``per_row=True``).
    """
    for where, c in _leaves(cache):
        if not c.is_trimmable():
            raise ValueError(
                f"[trim_cache] {where} ({type(c).__name__}) cannot be trimmed."
            )
    if isinstance(n, int):
        if n < 0:
            raise ValueError(f"[trim_cache] cannot trim a negative count {n}.")
        return min((c.trim(n) for c in cache), default=0)
    counts = _counts(n)
    result = list(counts)
    for i, c in enumerate(cache):
        if hasattr(c, "trim_per_row"):
            dropped = c.trim_per_row(counts)
        elif counts and all(k == counts[0] for k in counts):
            dropped = [c.trim(counts[0])] * len(counts)
        else:
            raise ValueError(
                f"[trim_cache] layer {i} ({type(c).__name__}) keeps one position for "
                f"all rows and cannot trim {counts} per row; build the caches with "
                "make_speculative_cache(..., per_row=True)."
            )
        result = [min(a, b) for a, b in zip(result, dropped)]
    return result


# ----------------------------------------------------------------- rewinding


def _copy(tree: Any) -> Any:
    """``tree`` with new array objects (sharing data) and new containers: a later
    in-place update of the originals does not reach the copy."""
    return tree_map(lambda x: mx.array(x) if isinstance(x, mx.array) else x, tree)


class CacheRewinder:
    """Rolls one model's caches back after a speculative step, whatever its layers.

    Trimmable layers are trimmed. Recurrent layers (``ArraysCache``) are restored
    from a :meth:`checkpoint` taken before the tokens were fed; the tokens kept
    are then fed through the model again, which also rewrites the KV layers of a
    hybrid model. Checkpoints cost no copy of the data (MLX arrays are immutable).

    Every rollback is checked: a layer that drops fewer tokens than asked raises
    instead of leaving a cache that silently differs.

    Args:
        model (nn.Module): The model the caches belong to.
        cache (list): Its caches (layers may be replaced in the list between
          rounds, e.g. by KV quantization).
    """

    def __init__(self, model: nn.Module, cache: list[Any]) -> None:
        self.model = model
        self.cache = cache
        self.recurrent = any(isinstance(c, ArraysCache) for _, c in _leaves(cache))
        self._checkpoints: list[list[Any]] = []

    def reset(self) -> None:
        """Forget every checkpoint."""
        self._checkpoints.clear()

    def checkpoint(self) -> None:
        """Remember the recurrent state as it is now (a no-op without any)."""
        if self.recurrent:
            self._checkpoints.append(
                [
                    _copy(c.state) if isinstance(c, ArraysCache) else None
                    for _, c in _leaves(self.cache)
                ]
            )

    def rewind(self, fed: mx.array, keep: int, *, since: int = 0) -> None:
        """Keep only the first ``keep`` of the tokens ``fed`` since checkpoint ``since``.

        Args:
            fed (mx.array): ``[S]`` the tokens fed since that checkpoint, in order.
            keep (int): How many of them the caches keep, ``0 <= keep <= S``.
            since (int): Index of the checkpoint, in the order taken since
              :meth:`reset`. Default: ``0``.

        Raises:
            RuntimeError: if a layer cannot drop what it must (e.g. a window
              rolled back deeper than its headroom).
        """
        drop = fed.size - keep
        if drop == 0:
            return
        if not self.recurrent:
            self._trim(drop)
            return
        saved = self._checkpoints[since]
        for (_, c), state in zip(_leaves(self.cache), saved):
            if state is not None:
                c.state = _copy(state)
        self._trim(fed.size)
        if keep:
            self.model(fed[:keep][None], cache=self.cache)

    def _trim(self, n: int) -> None:
        for where, c in _leaves(self.cache):
            if isinstance(c, ArraysCache):
                continue
            dropped = c.trim(n)
            if dropped != n:
                raise RuntimeError(
                    f"[speculative decoding] {where} ({type(c).__name__}) rolled back "
                    f"{dropped} of {n} tokens; a speculative round must not draft "
                    "more than the caches can roll back."
                )


# -------------------------------------------------------------- quantization


@dataclass(frozen=True)
class KVQuantization:
    """mlx-lm's KV-cache quantization (``kv_bits``), switched on at the same token.

    mlx-lm's ``generate_step`` turns each ``KVCache`` into a ``QuantizedKVCache``
    after the first model call that leaves ``start`` or more tokens in it. Fed one
    token at a time, the tokens at positions ``>= max(start, 1)`` are computed
    against the quantized cache and the earlier ones against full precision; the
    decode loop keeps the same boundary by never letting one call cross it.

    Args:
        bits (int): Bits per element. Default: ``8``.
        group_size (int): Elements per quantization group. Default: ``64``.
        start (int): Cache length at which quantization starts. Default: ``5000``
          (mlx-lm's).
    """

    bits: int = 8
    group_size: int = 64
    start: int = 5000

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(
                f"[KVQuantization] bits must be 2-6 or 8, got {self.bits}."
            )
        if self.group_size not in (32, 64, 128):
            raise ValueError(
                f"[KVQuantization] group_size must be 32, 64 or 128, got {self.group_size}."
            )
        if self.start < 0:
            raise ValueError(f"[KVQuantization] start must be >= 0, got {self.start}.")

    @property
    def boundary(self) -> int:
        """First position computed against the quantized cache."""
        return max(self.start, 1)

    def check(self, model: nn.Module, cache: Sequence[Any]) -> None:
        """Refuse, before any generation, what would fail once quantization starts.

        That is a sliding-window layer (mlx-lm has no quantized form of it), or a
        model whose attention cannot read a ``QuantizedKVCache`` (found by one
        forward pass of one token on fresh quantized caches).

        Args:
            model (nn.Module): The model ``cache`` belongs to.
            cache (list): Its caches.

        Raises:
            ValueError: naming the layer, or the model type and the error.
        """
        for where, c in _leaves(cache):
            if isinstance(c, (RollbackKVCache, RotatingKVCache)):
                raise ValueError(
                    f"[KVQuantization] {where} is a sliding-window cache "
                    f"({type(c).__name__}); mlx-lm has no quantized form of it "
                    "(its RotatingKVCache raises NotImplementedError)."
                )
        if not any(type(c) is KVCache for c in cache):
            return
        try:
            probe = [
                c.to_quantized(group_size=self.group_size, bits=self.bits)
                if type(c) is KVCache
                else c
                for c in mlx_lm_cache.make_prompt_cache(model)
            ]
            mx.eval(model(mx.zeros((1, 1), mx.uint32), cache=probe))
        except Exception as e:  # any failure here would end a generation later
            model_type = getattr(model, "model_type", type(model).__name__)
            raise ValueError(
                f"[KVQuantization] {model_type} cannot run on a QuantizedKVCache "
                f"(bits={self.bits}, group_size={self.group_size}): "
                f"{type(e).__name__}: {e}"
            ) from e

    def room(self, cache: Sequence[Any]) -> int | None:
        """Tokens the next model call may feed without crossing the switch
        (``None``: no bound, nothing left to switch)."""
        for c in cache:
            if hasattr(c, "to_quantized"):
                offset = cast(int, c.offset)
                return self.boundary - offset if offset < self.boundary else None
        return None

    def apply(self, cache: list[Any]) -> None:
        """Switch the layers whose time has come, in place in the list."""
        for i, c in enumerate(cache):
            if hasattr(c, "to_quantized") and c.offset >= self.boundary:
                cache[i] = c.to_quantized(group_size=self.group_size, bits=self.bits)
