"""Runs any transformers causal LM over an engine-owned :class:`~draftwise.engine.cache.KVCache`.

The model is driven through transformers' own extension points only:

- ``cache=KVCache`` (``past_key_values=`` before transformers 5.24, see :func:`cache_argument`):
  each attention layer writes its new keys/values at every row's own length and attends over
  slots ``[0, S)``;
- ``position_ids [B, T]``: ``position = slot - starts_b`` (each row counts from its first real token);
- ``attention_mask [B, 1, T, S]``: a 4-D mask, which ``create_causal_mask`` passes through unchanged.
  Query t of row b (at slot ``lengths_b + t``) may attend slot s iff
  ``starts_b <= s <= lengths_b + t``; a query on left padding attends only itself, so that no
  softmax row is empty (an empty row gives NaN, which would reach the next layer's keys and
  values). ``sdpa`` gets it as bool, ``eager`` as an additive float mask (0 or the dtype's min).
- the attention interface: on the CPU, multi-token forwards of an ``sdpa`` model with grouped
  key/value heads run :func:`draftwise.engine.attention.sdpa_attention` (same numbers, no
  per-head copies of the keys and values).

Threads: the skinny-GEMM routing and the attention switch change the model's modules for the
duration of a forward, so runners of the same model take turns for those forwards
(:func:`model_lock`); code that runs the same model outside a runner, in another thread at the
same time, would see the switched modules (same numbers to float rounding, but not bit for bit).

Host syncs: none in :meth:`ModelRunner.extend` while the cache's host-side bound of
``max(lengths)`` keeps every row within the capacity (see ``KVCache``); near the capacity, one sync
reads the exact lengths. ``prefill`` validates the attention mask (one sync); ``rollback`` and
``select_rows`` validate their argument (one sync each).

Token trees slot in without a new cache: a tree forward writes its T nodes at
``[lengths_b, lengths_b + T)`` like ``extend``, with positions ``lengths_b - starts_b + depth`` and the
tree's ancestor bits in place of the causal block of the mask; ``KVCache.commit_path`` then moves the
accepted path to consecutive slots and commits it.

Sliding-window layers (Mistral, Gemma 2 and 3, Qwen2 with ``use_sliding_window``): the cache keeps
every layer's full history and a sliding layer's mask also hides the keys that fell out of its window
(transformers' convention: the query at position p sees keys at positions ``(p - window, p]``; in a
tree forward, positions by depth). Models with sliding and full layers get the masks keyed by layer
type (``{"full_attention": m, "sliding_attention": m_w}``, the mapping their forwards take from
``generate``); a model whose layers are all of one kind gets that kind's mask as a tensor. Which layer
is which follows transformers' ``create_masks_for_generate``: ``config.layer_types`` where the config
has it, else every layer is sliding when ``config.sliding_window`` is set. Nothing is evicted, so a
rolled-back draft never costs a later token its history; the price is memory: a sliding layer's
cache is as long as a full layer's (see ``docs/engine.md``).

Not supported (rejected when the runner is built, naming the layer type): chunked attention
(Llama 4), linear attention and any other layer type, bidirectional attention
(``use_bidirectional_attention``), and attention implementations other than ``sdpa`` and ``eager``
(flash-attention kernels take no arbitrary 4-D mask).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import weakref

import torch
import transformers
from packaging.version import Version

from . import attention, compiling, skinny_linear
from .compiling import COMPILE_MAX_TOKENS
from .cache import KVCache
from .distributed import local_kv_heads

__all__ = ["ModelRunner"]

_MASKED_ATTENTION = ("sdpa", "eager")

# The skinny-GEMM routing and the attention switch change a model's modules for one forward, so
# two threads running the same model through runners take turns (one lock per model).
_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def tree_attention_backend(device: torch.device) -> str | None:
    """The kernel a token-tree forward's attention runs on; None keeps SDPA with the dense tree mask.

    SDPA with the mask is the default everywhere: on an H200 a tree forward in the default
    target's shape (30 layers, batch 1) took 10-44% longer through the Triton tree-attention
    kernel, whose device time is lower but whose two launches a layer cost more host time than
    they save (``bench/gpu_engine.py``). ``DRAFTWISE_TREE_ATTENTION=triton`` routes CUDA tree
    forwards through the kernel, which pays where attention dominates (long prefixes, batches)."""
    choice = os.environ.get("DRAFTWISE_TREE_ATTENTION", "sdpa")
    if choice not in ("sdpa", "triton"):
        raise ValueError(f"DRAFTWISE_TREE_ATTENTION: expected 'sdpa' or 'triton', got {choice!r}")
    if choice == "sdpa" or device.type != "cuda":
        return None
    from draftwise.kernels.backend import has_triton

    if not has_triton():
        raise RuntimeError("DRAFTWISE_TREE_ATTENTION=triton: triton is not installed (pip install 'triton>=3.4')")
    return "triton"


def model_lock(model) -> threading.RLock:
    """The lock that runners hold while they run ``model`` with its modules switched."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


# transformers 5.24 renamed the forward argument that takes the KV cache from ``past_key_values``
# to ``cache``; the old name warns until it goes away in 5.40.
CACHE_ARGUMENT_SINCE = Version("5.24.0")


def cache_argument(model) -> str:
    """The name under which ``model``'s forward takes the KV cache: ``"cache"`` or ``"past_key_values"``.

    Read from the forward's signature, so that a model follows its own modeling code; a forward
    whose signature names neither (wrapped as ``*args, **kwargs``) gets the installed release's
    name. Passing a name the forward does not know would land in its ``**kwargs``, unused: the
    model would build a cache of its own and the runner's would stay empty.
    """
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        parameters = {}
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    installed = Version(Version(transformers.__version__).base_version)
    return "cache" if installed >= CACHE_ARGUMENT_SINCE else "past_key_values"


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _cache_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) from a config; GPT-2 / GPT-NeoX have no ``num_key_value_heads``."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, kv_heads, head_dim


FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


def layer_kinds(config) -> tuple[list[str], int | None]:
    """(each layer's attention type, the sliding window or None) of a text config; raises
    ValueError for layers the runner cannot mask (chunked, linear, bidirectional, unknown).

    The layer types are read as transformers' ``create_masks_for_generate`` reads them (the masks
    the model's forward takes precomputed): ``config.layer_types`` when the config has it, else
    every layer sliding when ``config.sliding_window`` is set, chunked when
    ``config.attention_chunk_size`` is, full otherwise."""
    layers = config.num_hidden_layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if getattr(config, "sliding_window", None) is not None:
            layer_types = [SLIDING_ATTENTION] * layers
        elif getattr(config, "attention_chunk_size", None) is not None:
            layer_types = ["chunked_attention"] * layers
        else:
            layer_types = [FULL_ATTENTION] * layers
    layer_types = list(layer_types)
    other = sorted(set(layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION})
    if other:
        raise ValueError(
            f"ModelRunner: the model has {other} layers; only full-attention and sliding-window layers "
            "are supported (chunked and linear attention need masks/caches of their own)"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("ModelRunner: the model has bidirectional attention (`use_bidirectional_attention=True`); "
                         "only causal language models are supported")
    window = None
    if SLIDING_ATTENTION in layer_types:
        window = getattr(config, "sliding_window", None)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"ModelRunner: the model has sliding_attention layers but `config.sliding_window` is "
                             f"{window!r}, expected a positive int")
    return layer_types, window


class ModelRunner:
    """A causal LM, its preallocated KV cache, and the three calls of a decode loop.

    Args:
        model: a transformers causal LM (``...ForCausalLM``), full-attention and sliding-window
            layers, ``sdpa`` or ``eager`` attention. Put it in eval mode yourself; forwards run under
            ``torch.inference_mode()``.
        batch_size: rows allocated in the cache (``prefill`` may use fewer).
        capacity: slots per row: the prompt (padding included) plus every token ever appended,
            plus the T of the widest forward (drafted tokens are written before they are accepted).
        compile: run ``extend`` forwards of up to ``COMPILE_MAX_TOKENS`` tokens through
            ``torch.compile`` (inductor, dynamic shapes). The elementwise work of every layer is
            fused and the Python of transformers' modeling code leaves the decode loop
            (``python bench/step_costs.py`` measures the forwards). Call :meth:`precompile` to
            compile the graphs up front, else the first forward of each kind compiles; later
            runners of the same model reuse the graphs. Logits match the eager forward to float rounding.

    Attributes:
        model, cache (:class:`KVCache`), vocab_size (width of the logits; may exceed the tokenizer's
        vocabulary when the embeddings are padded).

    The logits returned by ``prefill``/``extend`` are inference tensors: edit them in place only
    under ``torch.inference_mode()``, or clone them first.
    """

    def __init__(self, model, batch_size: int, capacity: int, compile: bool = False):
        config = _text_config(model)
        with model_lock(model):  # not while another thread's forward has the modules switched
            attn = getattr(model.config, "_attn_implementation", None) or "eager"
            linears = skinny_linear.for_model(model)  # CPU fp32: skinny GEMM for verification-sized forwards
        if attn not in _MASKED_ATTENTION:
            raise ValueError(
                f"ModelRunner: attention implementation {attn!r} is not supported; load the model with "
                f"attn_implementation in {_MASKED_ATTENTION}"
            )
        layer_types, window = layer_kinds(config)
        layers, kv_heads, head_dim = _cache_geometry(config)
        param = next(model.parameters())
        self.model = model
        self.attn_implementation = attn
        # Sliding-window layers: the window (None: every layer attends to the whole prefix), the
        # layers that have it, and whether the forward takes its masks keyed by layer type (models
        # that mix both kinds) rather than one tensor for all layers.
        self.window = window
        self.sliding_layers = frozenset(i for i, kind in enumerate(layer_types) if kind == SLIDING_ATTENTION)
        self.mask_by_type = 0 < len(self.sliding_layers) < len(layer_types)
        self.cache = KVCache(
            layers,
            batch_size,
            local_kv_heads(model, kv_heads, cache_argument(model)),  # this process's share under tp_plan
            head_dim,
            capacity,
            dtype=param.dtype,
            device=param.device,
            capacity_hint="the `capacity` (or `max_length`) argument of the runner",
        )
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        self.vocab_size = int(weight.shape[0]) if weight is not None else int(config.vocab_size)
        self.device = param.device
        self.dtype = param.dtype
        self.linears = linears
        # CPU sdpa with grouped key/value heads: multi-token forwards keep them inside SDPA
        self.gqa_attention = attn == "sdpa" and self.device.type == "cpu" and kv_heads < config.num_attention_heads
        # token trees on CUDA: the fused tree-attention kernel instead of SDPA with a dense mask (an
        # ``eager`` model keeps its own attention: its layers may do what SDPA does not, soft-capping)
        self.tree_kernel = tree_attention_backend(self.device) if attn == "sdpa" else None
        switches = (self.linears is not None or self.gqa_attention or self.tree_kernel is not None
                    or (attn == "sdpa" and self.device.type == "cpu"))  # unmasked decode steps switch too
        self._switch_lock = model_lock(model) if switches else contextlib.nullcontext()
        self.compiled = bool(compile)
        self.cache_argument = cache_argument(model)

    # ------------------------------------------------------------------ state

    @property
    def lengths(self) -> torch.Tensor:
        """LongTensor [B]: committed slots per row (a snapshot: the runner replaces, never mutates it)."""
        return self.cache.lengths

    @property
    def starts(self) -> torch.Tensor:
        """LongTensor [B]: first valid slot per row (number of left-padding tokens of its prompt)."""
        return self.cache.starts

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def rollback(self, lengths: torch.Tensor) -> None:
        """Move each row back to ``lengths_b`` (at most its current length). O(1), one validation sync."""
        self.cache.rollback(lengths)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (indices into the live batch), in that order."""
        self.cache.select_rows(rows)

    def reset(self) -> None:
        self.cache.reset()

    # ------------------------------------------------------------------ forwards

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Start new sequences from left-padded prompts.

        Args:
            input_ids: LongTensor [B, T] (B at most the allocated batch size).
            attention_mask: [B, T] of 0/1, zeros only on the left (left padding); None: no padding.
            last_only: return only the logits at each row's last prompt token.

        Returns:
            logits [B, T, V] (or [B, 1, V] with ``last_only``). Logits at padding positions are
            meaningless. Afterwards ``lengths == T`` and ``starts_b`` = padding of row b.
        """
        self._check_tokens("input_ids", input_ids, None)
        batch, steps = input_ids.shape
        if batch > self.cache.max_batch_size:
            raise ValueError(
                f"ModelRunner.prefill: `input_ids` has {batch} rows, the cache was built for at most "
                f"{self.cache.max_batch_size}"
            )
        if steps > self.cache.capacity:
            raise ValueError(
                f"KV cache full: the prompts need {steps} slots (padding included) but the capacity is "
                f"{self.cache.capacity}; raise {self.cache.capacity_hint}"
            )
        if attention_mask is None:
            starts = torch.zeros(batch, dtype=torch.long, device=self.device)
        else:
            starts = self._padding_from_mask(attention_mask, batch, steps)
        self.cache.start(starts, batch)
        # One int-advance: lengths become T and the host bound stays exact.
        logits = self._forward(input_ids, logits_to_keep=1 if last_only else 0)
        self.cache.advance(steps)
        return logits

    def extend(self, tokens: torch.Tensor, num_valid: torch.Tensor | None = None) -> torch.Tensor:
        """Append T tokens per row at that row's length and return their logits [B, T, V].

        Row b's tokens take slots ``[lengths_b, lengths_b + T)`` and positions
        ``lengths_b - starts_b + t``. Then ``lengths += num_valid`` (default T): only the first
        ``num_valid_b`` tokens of row b are committed; the others stay written but uncommitted
        (hidden by the mask, overwritten by the next forward). ``num_valid`` must lie in [0, T]
        (checked on the device, without a host sync). A speculative step can also commit all T
        and ``rollback`` later.
        """
        self._check_tokens("tokens", tokens, self.cache.batch_size)
        if num_valid is not None:
            num_valid = torch.as_tensor(num_valid, device=self.device)
            if num_valid.shape != (tokens.shape[0],) or num_valid.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"ModelRunner.extend: `num_valid` must be an integer tensor of shape [{tokens.shape[0]}], "
                    f"got {tuple(num_valid.shape)} {num_valid.dtype}"
                )
            torch._assert_async(
                ((num_valid >= 0) & (num_valid <= tokens.shape[1])).all(),
                "ModelRunner.extend: `num_valid` must lie in [0, T]",
            )
        logits = self._forward(tokens, compiled=self.compiled and tokens.shape[1] <= COMPILE_MAX_TOKENS)
        self.cache.advance(tokens.shape[1] if num_valid is None else num_valid)
        return logits

    def extend_tree(self, tokens: torch.Tensor, depth: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
        """Read one token tree per row (a :class:`~draftwise.engine.tree.DraftTree`'s ``tokens``,
        ``depth`` and ``ancestors``) and return every node's logits ``[B, T, V]``.

        Node t of row b takes slot ``lengths_b + t`` and position ``lengths_b - starts_b +
        depth[b, t]``; it attends to the row's committed slots and to the nodes whose bit is set in
        ``ancestors[b, t]`` (padding nodes, with no bit set, to themselves only). Nothing is
        committed: ``cache.commit_path(path, num_accepted)`` keeps the accepted path (eager only)."""
        self._check_tokens("tokens", tokens, self.cache.batch_size)
        if depth.shape != tokens.shape or ancestors.shape != tokens.shape:
            raise ValueError(f"ModelRunner.extend_tree: `depth` and `ancestors` must have the shape of `tokens` "
                             f"{tuple(tokens.shape)}")
        return self._forward(tokens, tree=(depth, ancestors))

    def precompile(self) -> None:
        """With ``compile=True``: compile now every graph that ``extend`` can need with this
        cache, so that no compile falls inside a generation: 1 token and several tokens, for one
        live row and (when the cache has several) for several rows, since a batch shrinks to one
        row as its rows finish. Graphs already compiled for the model are reused. Leaves the
        cache reset."""
        if not self.compiled or self.cache.capacity < 4:
            return
        done = compiling.precompiled_kinds(self.model)
        batch = self.cache.max_batch_size
        # Sizes of 1 get graphs of their own (the cache's rows, the live rows, the tokens).
        kinds = ({"one-row cache": 1} if batch == 1
                 else {"one live row of a larger cache": 1, "several live rows": batch})
        todo = {kind: rows for kind, rows in kinds.items() if kind not in done}
        if not todo:
            return
        from tqdm.auto import tqdm

        shapes = [(rows, steps) for rows in todo.values() for steps in (1, 2)]
        with torch.inference_mode():
            for rows, steps in tqdm(shapes, desc=f"compiling {type(self.model).__name__} (once)",
                                    unit="graph", leave=False):
                # 2 prompt slots: a length of 1 would be compiled as a constant, not a symbol
                self.prefill(torch.zeros(rows, 2, dtype=torch.long, device=self.device))
                self.extend(torch.zeros(rows, steps, dtype=torch.long, device=self.device))
        self.reset()
        done.update(todo)

    # ------------------------------------------------------------------ internals

    def _forward(self, tokens: torch.Tensor, logits_to_keep: int = 0, compiled: bool = False,
                 tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        steps = tokens.shape[1]
        kv_length = self.cache.prepare(steps)  # raises before anything is written if a row is full
        cache = self.cache
        kwargs = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        call = compiling.compiled_call() if compiled else compiling.call_model
        unmasked = tree is None and not compiled and self._sees_every_key(steps, kv_length)
        with self._switched(tokens.numel(), steps, compiled, unmasked), torch.inference_mode():
            slots = cache.write_slots(steps)[:, 0, :, 0]  # [B, T]: the slots the layers write (one index for all)
            tree_kernel = contextlib.nullcontext()
            if tree is None:
                position_ids = (slots - cache.starts[:, None]).clamp_min(0)  # padding queries: position 0
                mask = self._attention_mask(slots, kv_length)
            else:  # positions by depth, and the tree's ancestors instead of the causal pattern
                depth, ancestors = tree
                position_ids = (cache.lengths - cache.starts)[:, None] + depth
                mask = self._tree_mask(slots, kv_length, ancestors, depth)
                if self.tree_kernel is not None:  # sliding layers keep SDPA with their mask
                    tree_kernel = attention.using_tree(self.model, cache.lengths, ancestors, cache.starts,
                                                       self.tree_kernel, masked_layers=self.sliding_layers)
            if compiled and not tokens.is_inference():
                tokens = tokens.clone()  # graphs are guarded on it: one kind of tensor whoever calls
            with tree_kernel:
                out = call(
                    self.model,
                    input_ids=tokens,
                    attention_mask=mask,
                    position_ids=position_ids,
                    use_cache=True,
                    **{self.cache_argument: cache},
                    **kwargs,
                )
        return out.logits

    @contextlib.contextmanager
    def _switched(self, rows: int, steps: int, compiled: bool, unmasked: bool = False):
        """The model's modules as this forward runs them, under the model's lock (other threads'
        forwards of the same model wait): on the CPU, the skinny GEMM for verification-sized fp32
        linear layers, SDPA keeping grouped key/value heads for forwards of several tokens, and
        SDPA without a mask for a decode step that sees every key."""
        routing = (self.linears.routing(rows, every_size=compiled) if self.linears is not None
                   else contextlib.nullcontext())
        if unmasked or (self.gqa_attention and steps > 1):
            switch = attention.using(self.model, unmasked=unmasked)
        else:
            switch = contextlib.nullcontext()
        with self._switch_lock, routing, switch:
            yield

    def _sees_every_key(self, steps: int, kv_length: int) -> bool:
        """A CPU decode step of one unpadded row whose cache is full up to the keys the forward
        reads (``kv_length``), on an ``sdpa`` model without sliding windows: its mask is all true.
        (On the CPU the two reads below cost nothing; elsewhere the masked path is kept.)"""
        cache = self.cache
        return (steps == 1 and cache.batch_size == 1 and self.window is None and self.device.type == "cpu"
                and self.attn_implementation == "sdpa" and int(cache.starts[0]) == 0
                and int(cache.lengths[0]) == kv_length - 1)

    def _attention_mask(self, slots: torch.Tensor, kv_length: int):
        """[B, 1, T, S]: query at ``slots[b, t]`` sees s iff ``starts_b <= s <= slots[b, t]``, or
        ``s == slots[b, t]`` (a padding query sees itself only); sliding layers also need
        ``s > slots[b, t] - window`` (positions and slots differ by ``starts_b`` alone)."""
        s = torch.arange(kv_length, device=self.device)
        query = slots[:, :, None]  # [B, T, 1]
        allowed = (s <= query) & ((s >= self.cache.starts[:, None, None]) | (s == query))
        window = None if self.window is None else s > query - self.window
        return self._layer_masks(allowed, window)

    def _tree_mask(self, slots: torch.Tensor, kv_length: int, ancestors: torch.Tensor, depth: torch.Tensor):
        """[B, 1, T, S]: node t sees the row's committed slots, the nodes whose bit is set in
        ``ancestors[b, t]``, and itself. Sliding layers see only the keys whose position (a
        committed slot's ``s - starts_b``, a node's ``lengths_b - starts_b + depth``) lies in
        ``(p - window, p]`` of the node's position p."""
        s = torch.arange(kv_length, device=self.device).view(1, 1, -1)
        lengths = self.cache.lengths.view(-1, 1, 1)
        committed = (s < lengths) & (s >= self.cache.starts.view(-1, 1, 1))
        node = s - lengths  # [B, 1, S]: which tree node a slot holds (when in [0, T))
        in_tree = (node >= 0) & (node < ancestors.shape[1])
        bit = (ancestors.unsqueeze(-1) >> node.clamp(0, 63)) & 1
        allowed = committed | (in_tree & (bit != 0)) | (s == slots[:, :, None])
        window = None
        if self.window is not None:
            # slot-like key positions (slot = starts + position): a node's is lengths + its depth
            node_depth = depth.gather(1, node[:, 0].clamp(0, depth.shape[1] - 1))[:, None]  # [B, 1, S]
            key = torch.where(in_tree, lengths + node_depth, s)
            query = lengths + depth[:, :, None]  # [B, T, 1]
            window = key > query - self.window
        return self._layer_masks(allowed, window)

    def _layer_masks(self, allowed: torch.Tensor, window: torch.Tensor | None):
        """The forward's ``attention_mask`` from the full-attention pattern ``allowed [B, T, S]`` and
        the sliding layers' window ``[B, T, S]`` (None without sliding layers): one mask for all
        layers, or the masks keyed by layer type."""
        if window is None:
            return self._as_mask(allowed)
        sliding = self._as_mask(allowed & window)
        if not self.mask_by_type:
            return sliding
        return {FULL_ATTENTION: self._as_mask(allowed), SLIDING_ATTENTION: sliding}

    def _as_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S]: bool for ``sdpa``, additive float (0 or the dtype's min) for ``eager``."""
        allowed = allowed[:, None]
        if self.attn_implementation == "sdpa":
            return allowed
        zeros = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        return zeros.masked_fill(~allowed, torch.finfo(self.dtype).min)

    def _padding_from_mask(self, attention_mask, batch: int, steps: int) -> torch.Tensor:
        mask = torch.as_tensor(attention_mask, device=self.device)
        if mask.shape != (batch, steps):
            raise ValueError(
                f"ModelRunner.prefill: `attention_mask` must have the shape of `input_ids` {(batch, steps)}, "
                f"got {tuple(mask.shape)}"
            )
        mask = mask.long()
        kept = mask.sum(dim=1)
        starts = steps - kept
        # Left padding: row b is 0 on [0, starts_b) and 1 after. One sync to check it.
        left_padded = mask == (torch.arange(steps, device=self.device) >= starts[:, None]).long()
        ok, empty = torch.stack([left_padded.all(), (kept == 0).any()]).tolist()
        if not ok:
            raise ValueError(
                "ModelRunner.prefill: `attention_mask` must be 0/1 with the zeros only on the left "
                "(left-padded prompts)"
            )
        if empty:
            raise ValueError("ModelRunner.prefill: every row of `attention_mask` needs at least one 1 (a token)")
        return starts

    def _check_tokens(self, name: str, tokens: torch.Tensor, batch: int | None) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            got = tokens.dtype if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise TypeError(f"ModelRunner: `{name}` must be an integer tensor, got {got}")
        if tokens.ndim != 2 or tokens.shape[1] == 0 or (batch is not None and tokens.shape[0] != batch):
            rows = "B" if batch is None else batch
            raise ValueError(
                f"ModelRunner: `{name}` must have shape [{rows}, T] with T >= 1, got {tuple(tokens.shape)}"
            )
        if tokens.device != self.device:
            raise ValueError(f"ModelRunner: `{name}` is on {tokens.device}, the model on {self.device}")
