"""Preallocated KV cache with one length per row, usable as a transformers ``Cache``.

Layout: per model layer, ``keys`` and ``values`` buffers ``[max_batch, H_kv, capacity, D]`` allocated
once. Row ``b`` of the live batch owns slots ``[0, capacity)`` of buffer row ``b``:

    slot:     0    starts_b          lengths_b         lengths_b + T      capacity
              | pad |   committed tokens  | being written |   free ...   |

- ``starts [B]``: first valid slot (left padding of the prompt lies in ``[0, starts_b)``; it is never
  attended).
- ``lengths [B]``: committed slots. Slots at or past ``lengths_b`` may hold stale keys/values (written by
  a forward whose tokens were not accepted); the attention mask hides them and the next forward
  overwrites them.

Verbs: ``update`` (called by the model's attention layers; writes T new slots per row at the row's own
length), ``advance(counts)`` (commit after a forward), ``rollback(lengths)`` (O(1): only the lengths
move back), ``select_rows(rows)`` (finished rows leave the batch), ``commit_path`` (a token-tree step
keeps only its accepted path), ``reset()``.

How transformers sees it: ``KVCache`` is a ``transformers.Cache`` whose layers are ``KVLayer``
(a ``CacheLayerMixin``). Every attention module in Llama, Qwen2, GPT-2 and GPT-NeoX calls
``past_key_values.update(key, value, layer_idx)`` and attends over what it returns:
``[B, H_kv, S, D]`` views of slots ``[0, S)`` with ``S = max_length + T``. The caller must pass a 4-D
attention mask of width S (transformers returns a 4-D mask unchanged) and explicit ``position_ids``;
:class:`draftwise.engine.models.ModelRunner` does both.

Sliding-window layers (Gemma 2 and 3, Mistral, Qwen2 with sliding layers) keep every slot too: the
runner's mask for those layers hides the keys older than the window, so nothing is ever evicted and
``rollback`` never has to bring back keys that a rejected draft pushed out. The price is memory: a
sliding layer holds ``capacity`` slots, as a full-attention layer does (a ring buffer of the window
plus the widest forward would hold fewer on long contexts, at the cost of wrapped indices in every
verb and mask).

Host syncs: the cache keeps ``max_length``, a host-side upper bound of ``max(lengths)``, and slices
S and checks the capacity with it alone. It is exact after ``reset``, ``start``, ``rollback``,
``select_rows`` and ``advance(int)``. After ``advance(tensor)`` (ragged commits) it grows by the T of
the last forward (no row commits more than it wrote), and an asynchronous copy of ``max(lengths)`` to
the host is started; ``prepare`` (before the next forward) lowers the bound by the slack that copy
shows once it has landed, without waiting (on the CPU it has always landed; on CUDA the bound may stay
loose by a step or two: S is then a few masked slots wider). Only when the bound says a row might
overflow does ``check_room`` read the exact lengths (one sync). ``rollback`` and ``select_rows``
validate their argument, one sync each.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["KVCache", "KVLayer"]


class KVLayer(CacheLayerMixin):
    """One layer's preallocated buffers; the row lengths live in the owning :class:`KVCache`."""

    is_compileable = False
    # Every layer holds all slots, sliding-window ones included: the window is in the runner's mask.
    is_sliding = False
    # ``crop`` (one length for all rows) would not keep ragged rows right: use ``KVCache.rollback``.
    is_croppable = False

    def __init__(self, cache: KVCache, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self._cache = cache
        self.keys_buffer = keys  # [max_batch, H_kv, capacity, D]
        self.values_buffer = values  # [max_batch, H_kv, capacity, D_v]
        self.keys = keys
        self.values = values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    @property
    def batch_size(self) -> int:
        return self._cache.batch_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers are allocated when the cache is built."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[B, H_kv, T, D]`` at slots ``[lengths_b, lengths_b + T)``; return slots ``[0, S)``."""
        cache = self._cache
        batch, heads, steps = key_states.shape[:3]
        if (
            batch != cache.batch_size
            or heads != self.keys_buffer.shape[1]
            or key_states.shape[-1] != self.keys_buffer.shape[-1]
            or value_states.shape[-1] != self.values_buffer.shape[-1]
        ):
            raise ValueError(
                f"KVCache.update: expected key/value states [{cache.batch_size}, {self.keys_buffer.shape[1]}, T, "
                f"{self.keys_buffer.shape[-1]}] / [..., {self.values_buffer.shape[-1]}], got "
                f"{tuple(key_states.shape)} / {tuple(value_states.shape)}"
            )
        keys = self.keys_buffer[:batch]
        values = self.values_buffer[:batch]
        # slots[b, t] = lengths_b + t: one scatter per tensor, every row at its own offset.
        slots = cache.write_slots(steps)  # [B, 1, T, 1]
        keys.scatter_(2, slots.expand_as(key_states), key_states.to(keys.dtype))
        values.scatter_(2, slots.expand_as(value_states), value_states.to(values.dtype))
        kv_length = cache.max_length + steps
        return keys[:, :, :kv_length], values[:, :, :kv_length]

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._cache.max_length

    def get_max_length(self) -> int:
        return self._cache.capacity

    get_max_cache_shape = get_max_length  # its name in older transformers releases (5.0)

    def reset(self) -> None:
        """Buffers keep their stale contents: lengths, not zeros, say what is valid."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVCache does not support beam search; use KVCache.select_rows")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KVCache keeps ragged rows; use KVCache.rollback(lengths)")


class KVCache(Cache):
    """Preallocated per-layer KV buffers with a committed length and a first valid slot per row.

    Args:
        num_layers: number of attention layers (one buffer pair each).
        batch_size: rows allocated (the live batch may later shrink with :meth:`select_rows`).
        num_kv_heads: key/value heads per layer.
        head_dim: key head dimension (``value_head_dim`` defaults to it).
        capacity: slots per row (prompt, padding included, plus everything generated).
        dtype, device: of the buffers (the model's).
        capacity_hint: what to raise when ``capacity`` is too small; named in the error message.

    Attributes:
        lengths: LongTensor [B], committed slots per row. Replaced, never mutated in place, by the
            verbs: a tensor read from it earlier is a snapshot.
        starts: LongTensor [B], first valid slot per row (left padding before it).
        capacity: int, slots per row.
        batch_size: int, live rows.
        max_length: int, host-side upper bound of ``max(lengths)`` (see the module docstring).

    Token trees (``commit_path``): a tree step writes its T nodes at slots ``[L_b, L_b + T)`` in one
    forward (the runner's mask then carries the tree's ancestor pattern instead of the causal one);
    after verification, ``commit_path(path, num_accepted)`` copies the accepted nodes' keys/values to
    the consecutive slots ``L_b, L_b + 1, ...`` (one gather and one scatter per layer) and advances
    the lengths, so the cache again holds a plain sequence.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        value_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        capacity_hint: str = "the `capacity` argument",
    ):
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("capacity", capacity),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCache: `{name}` must be a positive int, got {value!r}")
        value_head_dim = head_dim if value_head_dim is None else value_head_dim
        device = torch.device("cpu") if device is None else torch.device(device)
        layers = []
        # Ordinary tensors even when built under inference mode: forwards write them in either
        # mode, and compiled graphs are guarded on the kind of tensor they were compiled with.
        with torch.inference_mode(False):
            for _ in range(num_layers):
                keys = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
                values = torch.zeros(batch_size, num_kv_heads, capacity, value_head_dim, dtype=dtype, device=device)
                layers.append(KVLayer(self, keys, values))
        super().__init__(layers=layers)
        self.capacity = capacity
        self._max_batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.capacity_hint = capacity_hint
        self._mirror_host = None  # pinned host scalar for the asynchronous max(lengths) read (CUDA)
        self._write_slots = (None, 0, None)  # (lengths, steps, slots) of the forward being run
        self.reset()

    # ------------------------------------------------------------------ state

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def reset(self) -> None:
        """Empty every row and bring back all ``max_batch_size`` rows. The buffers are not cleared."""
        self._batch_size = self.max_batch_size
        self.lengths = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
        self.starts = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
        self._set_max_length(0)
        self._pending = 0  # slots written past the lengths by the last forward, not yet committed

    def start(self, starts: torch.Tensor, batch_size: int | None = None) -> None:
        """Begin new sequences: ``batch_size`` live rows (default all), first valid slot ``starts_b``,
        empty (``lengths = 0``; the prompt, padding included, is then written and advanced over)."""
        batch_size = self.max_batch_size if batch_size is None else batch_size
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"KVCache.start: batch size must be in [1, {self.max_batch_size}], got {batch_size}")
        starts = self._row_tensor("starts", starts, batch_size)
        self._batch_size = batch_size
        self.starts = starts
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._set_max_length(0)
        self._pending = 0

    def prepare(self, steps: int) -> int:
        """Before a forward of ``steps`` new slots per row: tighten ``max_length`` if an earlier
        asynchronous read of ``max(lengths)`` has landed, check the room, and return the width
        ``S = max_length + steps`` of the keys/values (and of the attention mask) of that forward."""
        self.refresh_max_length()
        self.check_room(steps)
        return self.max_length + steps

    def check_room(self, steps: int) -> None:
        """Raise ValueError, before anything is written, if some row cannot take ``steps`` more slots."""
        if self.max_length + steps <= self.capacity:
            return
        self._sync_max_length()  # the bound may be loose: one sync to read the exact lengths
        if self.max_length + steps <= self.capacity:
            return
        lengths = self.lengths.tolist()
        row = max(range(len(lengths)), key=lambda b: lengths[b])
        raise ValueError(
            f"KV cache full: row {row} needs {lengths[row] + steps} slots ({lengths[row]} used + {steps} new) "
            f"but the capacity is {self.capacity}; raise {self.capacity_hint}"
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by the attention layers; see :meth:`KVLayer.update`."""
        steps = key_states.shape[-2]
        self.check_room(steps)  # a host comparison unless some row may overflow
        self._pending = steps
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def write_slots(self, steps: int) -> torch.Tensor:
        """``[B, 1, T, 1]`` slots ``lengths_b + t`` that a forward of ``steps`` tokens writes: built by
        its first layer, reused by the others (``lengths`` is replaced, never mutated, by every verb,
        so the same tensor object means the same lengths)."""
        lengths, cached_steps, slots = self._write_slots
        if torch.compiler.is_compiling():
            # A compiled forward: the runner built this forward's slots just before calling the model
            # (tracing the check below would guard the graph on how the caller made ``lengths``).
            return slots
        if lengths is not self.lengths or cached_steps != steps:
            slots = (self.lengths[:, None] + torch.arange(steps, device=self.device))[:, None, :, None]
            self._write_slots = (self.lengths, steps, slots)
        return slots

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Upper bound of the committed length over rows (the rows differ; transformers only needs it
        when no ``position_ids`` are given, which the runner never does)."""
        return self.max_length

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        """(key/value length, offset) of a forward of ``query_length`` tokens; older transformers
        releases (5.0) pass the forward's ``cache_position`` tensor instead of its length."""
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[-1]
        return self.max_length + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.capacity

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # its name in older releases (5.0)
        return self.capacity

    @property
    def max_batch_size(self) -> int:
        """Rows allocated (a read-only property of transformers' ``Cache`` in older releases: 5.0)."""
        return self._max_batch_size

    # ------------------------------------------------------------------ verbs

    def advance(self, counts: torch.Tensor | int) -> None:
        """Commit ``counts`` more slots per row (int: the same for all rows) after a forward.

        ``counts`` must lie in [0, T] of the forward just run; a tensor is checked on the device
        (``torch._assert_async``), without a host sync.
        """
        if isinstance(counts, int):
            if counts < 0:
                raise ValueError(f"KVCache.advance: `counts` must be >= 0, got {counts}")
            self.lengths = self.lengths + counts
            self.max_length += counts
            return
        counts = self._row_tensor("counts", counts, self.batch_size)
        torch._assert_async((counts >= 0).all(), "KVCache.advance: `counts` must be >= 0")
        self.lengths = self.lengths + counts
        if self._pending:
            # No row commits more than the T slots the last forward wrote: a bound without a sync,
            # tightened later from an asynchronous copy of max(lengths).
            self.max_length += self._pending
            self._pending = 0
            self._mirror_max_length()
        else:
            self._sync_max_length()

    def rollback(self, lengths: torch.Tensor) -> None:
        """Move each row's length back to ``lengths_b`` (O(1): nothing is cleared). One host sync to
        validate ``starts_b <= lengths_b <= current lengths_b``."""
        lengths = self._row_tensor("lengths", lengths, self.batch_size)
        above, below, new_max = torch.stack(
            [(lengths > self.lengths).any().long(), (lengths < self.starts).any().long(), lengths.max()]
        ).tolist()
        if above:
            raise ValueError(
                "KVCache.rollback: `lengths` must not exceed the current lengths (rollback only moves back); "
                "some row asked for more"
            )
        if below:
            raise ValueError("KVCache.rollback: `lengths` must be >= the row's start (its left padding)")
        self.lengths = lengths
        self._set_max_length(new_max)
        self._pending = 0

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (indices into the live batch), in that order.

        Copies the kept rows' slots ``[0, max_length)`` to the front of the buffers (one index_select
        per buffer); one host sync to validate ``rows``.
        """
        rows = torch.as_tensor(rows, device=self.device)
        if rows.ndim != 1 or rows.dtype not in (torch.int32, torch.int64) or rows.numel() == 0:
            raise ValueError(
                f"KVCache.select_rows: `rows` must be a non-empty 1-D integer tensor, got shape "
                f"{tuple(rows.shape)} dtype {rows.dtype}"
            )
        rows = rows.long()
        lo, hi = torch.stack([rows.min(), rows.max()]).tolist()
        distinct = rows.unique().numel()
        if lo < 0 or hi >= self.batch_size or distinct != rows.numel():
            raise ValueError(
                f"KVCache.select_rows: `rows` must be distinct indices in [0, {self.batch_size}), "
                f"got {rows.numel()} indices in [{lo}, {hi}] ({distinct} distinct)"
            )
        used = self.max_length
        if used > 0:
            for layer in self.layers:
                for buf in (layer.keys_buffer, layer.values_buffer):
                    kept = buf[:, :, :used].index_select(0, rows)
                    buf[: rows.numel(), :, :used].copy_(kept)
        self.lengths = self.lengths.index_select(0, rows)
        self.starts = self.starts.index_select(0, rows)
        self._batch_size = rows.numel()
        self._sync_max_length()
        self._pending = 0

    def commit_path(self, path: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Keep the accepted path of a token-tree step and commit it.

        The step's forward wrote T tree nodes at slots ``[lengths_b, lengths_b + T)``. ``path [B, P]``
        holds node indices (in [0, T)) of each row's accepted path, root first; ``num_accepted [B]``
        how many of them count. Node ``path[b, i]`` moves to slot ``lengths_b + i`` (one gather, one
        scatter per buffer; entries past ``num_accepted`` are copied too and left uncommitted), then
        ``lengths += num_accepted``.
        """
        path = self._row_tensor("path", path, self.batch_size, ndim=2)
        num_accepted = self._row_tensor("num_accepted", num_accepted, self.batch_size)
        src = self.lengths[:, None] + path  # [B, P]
        dst = self.lengths[:, None] + torch.arange(path.shape[1], device=self.device)
        torch._assert_async((src < self.capacity).all(), "KVCache.commit_path: `path` points past the capacity")
        for layer in self.layers:
            for buf in (layer.keys_buffer, layer.values_buffer):
                live = buf[: self.batch_size]
                shape = (live.shape[0], live.shape[1], path.shape[1], live.shape[3])
                nodes = live.gather(2, src[:, None, :, None].expand(shape))
                live.scatter_(2, dst[:, None, :, None].expand(shape), nodes)
        self.advance(num_accepted)

    # ------------------------------------------------------------------ helpers

    def _set_max_length(self, value: int) -> None:
        self.max_length = value
        self._mirror = None

    def _sync_max_length(self) -> None:
        self._set_max_length(int(self.lengths.max()))

    def _mirror_max_length(self) -> None:
        """Start a copy of ``max(lengths)`` to the host without waiting for it (CUDA: pinned buffer and
        an event; other devices: the tensor itself, read when needed)."""
        current = self.lengths.max()
        event = None
        if current.device.type == "cuda":
            if self._mirror_host is None:
                self._mirror_host = torch.empty((), dtype=torch.long, pin_memory=True)
            self._mirror_host.copy_(current, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            current = self._mirror_host
        # (bound at the time of the copy, the copied value, its event)
        self._mirror = (self.max_length, current, event)

    def refresh_max_length(self) -> None:
        """Lower the ``max_length`` bound by the slack seen in the last mirrored ``max(lengths)``.

        Since the copy, the bound and the true maximum grew by the same bounds, so the slack then is
        slack now too. Never waits: a copy still in flight is used at a later call.
        """
        if self._mirror is None:
            return
        bound_then, value, event = self._mirror
        if event is not None and not event.query():
            return
        self.max_length -= bound_then - int(value)
        self._mirror = None

    def _row_tensor(self, name: str, value, batch_size: int, ndim: int = 1) -> torch.Tensor:
        value = torch.as_tensor(value, device=self.device)
        if value.ndim != ndim or value.shape[0] != batch_size:
            expected = f"[{batch_size}]" if ndim == 1 else f"[{batch_size}, P]"
            raise ValueError(f"KVCache: `{name}` must have shape {expected}, got {tuple(value.shape)}")
        if value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"KVCache: `{name}` must be an integer tensor, got {value.dtype}")
        return value.long()
