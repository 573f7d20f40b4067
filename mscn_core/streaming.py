"""Lazy item sequences: an archive larger than memory, read one step's items at a time.

A modality that offers ``scan``/``load`` (``OPTIONAL_CAPABILITIES`` in modality.py) lists
light :class:`ItemRef` handles to its items without reading their values; a
:class:`LazySequence` over them loads an item (or its Signal) only when indexed and keeps
the last few in a small LRU cache. ``meta_train`` indexes ``train[i]`` for the items of
each step, so peak memory is set by the cache and one batch, not by the archive.
Modalities without ``scan``/``load`` read eagerly into plain lists, and every helper here
passes plain sequences through unchanged.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, overload

# Items (or signals) kept after loading: hits for small archives and for an item asked
# for twice in a row; a bound, so a large archive never accumulates.
CACHE_ITEMS = 16
# Items ``fit_state`` sees when the data are lazy (a seeded subsample; all when fewer):
# training-set statistics are fitted without reading the whole archive first.
FIT_STATE_ITEMS = 256
# The random validation split of lazy data holds at most this many items: meta_train
# keeps its validation signals in memory (it re-scores them every ``val_every`` steps).
MAX_VAL_ITEMS = 128


class ItemRef(NamedTuple):
    """A light handle on one item: what the modality's ``load`` needs (``key``, the
    plugin's own: e.g. a path and a position in it) and the item's ``label``, equal to
    ``item_label`` of the loaded item (train/validation disjointness without loading)."""

    key: Any
    label: str


class LazySequence(Sequence):
    """``load(ref)`` for each reference, computed when indexed, the last ``cache_size``
    kept. ``loads`` counts the calls of ``load`` (tests, benchmarks)."""

    def __init__(self, refs: Sequence[Any], load: Callable[[Any], Any],
                 cache_size: int = CACHE_ITEMS) -> None:
        self.refs = list(refs)
        self._load = load
        self.cache_size = cache_size
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self.loads = 0

    def __len__(self) -> int:
        return len(self.refs)

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> LazySequence: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.subset(range(len(self.refs))[i])
        i = int(i)  # torch / numpy integers from a sampler
        if i < 0:
            i += len(self.refs)
        if not 0 <= i < len(self.refs):
            raise IndexError(f"item {i} of {len(self.refs)}")
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        value = self._load(self.refs[i])
        self.loads += 1
        if self.cache_size > 0:
            self._cache[i] = value
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return value

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self.refs)):
            yield self[i]

    def subset(self, indices: Sequence[int]) -> LazySequence:
        """These positions, still lazy (own cache)."""
        return LazySequence([self.refs[i] for i in indices], self._load, self.cache_size)

    def map(self, fn: Callable[[Any], Any], cache_size: int | None = None) -> LazySequence:
        """``fn`` of each loaded value, lazily (e.g. item → Signal); one cache, not two."""
        load = self._load
        return LazySequence(self.refs, lambda ref: fn(load(ref)),
                            self.cache_size if cache_size is None else cache_size)

    def labels(self) -> list[str]:
        """The items' labels from their references (nothing loaded)."""
        return [r.label for r in self.refs]


def offers_streaming(modality: Any) -> bool:
    """Whether the modality lists item references (``scan``) and loads one (``load``)."""
    return callable(getattr(modality, "scan", None)) and callable(getattr(modality, "load", None))


def lazy_items(modality: Any, refs: Sequence[ItemRef], options: Any = None,
               cache_size: int = CACHE_ITEMS) -> LazySequence:
    """The items behind ``refs``, loaded by the modality when indexed."""
    return LazySequence(refs, lambda ref: modality.load(ref, options), cache_size)


def is_lazy(items: Sequence[Any]) -> bool:
    return isinstance(items, LazySequence)


def as_signals(modality: Any, items: Sequence[Any], options: Any = None) -> Sequence[Any]:
    """Signals of the items: converted when indexed for lazy items, all now otherwise."""
    if is_lazy(items):
        return items.map(lambda item: modality.to_signal(item, options))
    return [modality.to_signal(i, options) for i in items]


def item_labels(modality: Any, items: Sequence[Any]) -> list[str]:
    """Each item's label: from the references for lazy items (nothing loaded)."""
    if is_lazy(items):
        return items.labels()
    return [modality.item_label(i) for i in items]


def subset(items: Sequence[Any], indices: Sequence[int]) -> Sequence[Any]:
    """These positions of the items: lazy stays lazy."""
    if is_lazy(items):
        return items.subset(indices)
    return [items[i] for i in indices]


def fit_sample(train: Sequence[Any], val: Sequence[Any], n: int = FIT_STATE_ITEMS,
               seed: int = 0) -> Sequence[Any]:
    """What ``fit_state`` sees: every item of eager data (as before); for lazy data at
    most ``n`` of train + validation, a seeded uniform subsample, loaded one at a time
    as the plugin iterates (nothing kept)."""
    if not (is_lazy(train) or is_lazy(val)):
        return list(train) + list(val)
    n_train, total = len(train), len(train) + len(val)
    picks = range(total) if total <= n else sorted(random.Random(seed).sample(range(total), n))
    return LazySequence(list(picks), lambda j: train[j] if j < n_train else val[j - n_train],
                        cache_size=0)


# Items the codec statistics need (per-position mean/std and symbol histograms of the
# adapted codes): a bounded sample of a streamed training set suffices.
CODEC_ITEMS = 1024


def bounded(items: Sequence[Any], n: int = CODEC_ITEMS, seed: int = 0) -> Sequence[Any]:
    """At most ``n`` of lazy items, a seeded subsample in their order; eager items as they
    are (their memory is already spent)."""
    if not is_lazy(items) or len(items) <= n:
        return items
    return items.subset(sorted(random.Random(seed).sample(range(len(items)), n)))
