"""A tqdm progress bar over futures or over a ``map``, in one call.

::

    from htcgrid_executor.progress import progress

    for future in progress(futures):                 # futures: yielded as they complete
        use(future.result())

    results = list(progress(executor.map(f, xs), total=len(xs)))   # a map: results in order

Works with any ``concurrent.futures`` executor. tqdm writes to stderr; pass tqdm's own keyword
arguments (``desc``, ``unit``, ``disable``, ``file``, ...) through.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future, as_completed
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress"]

def progress(
    items: Iterable[Any],
    total: int | None = None,
    *,
    timeout: float | None = None,
    **tqdm_kwargs: Any,
) -> Iterator[Any]:
    """Iterate over ``items`` with a progress bar.

    * ``items`` is a collection of ``Future`` objects (a list, a set, a dict's keys: anything
      with a ``len``): the futures are yielded as they complete (``as_completed``, with its
      ``timeout``), and the bar counts completed futures; its total is ``len(items)``.
    * ``items`` is an iterator of futures, such as ``as_completed(fs)``: they are yielded in its
      order, and the bar moves as each arrives (pass ``total=len(fs)`` for a percentage).
    * anything else (e.g. the iterator ``Executor.map`` returns): its values are yielded in their
      order and the bar counts them; ``total`` defaults to ``len(items)`` when it has one (a map
      iterator has none: pass ``total`` for a percentage and an ETA).

    The bar shows at once; nothing is taken from ``items`` before the first value is asked for.
    It closes when the iteration ends, raises, or is abandoned (the generator is closed).
    """
    try:
        length: int | None = len(items)  # type: ignore[arg-type]
    except TypeError:
        length = None
    if total is None:
        total = length
    iterator = iter(items)
    with tqdm(total=total, **tqdm_kwargs) as bar:
        first = next(iterator, _NOTHING)
        if first is _NOTHING:
            return
        if isinstance(first, Future) and length is not None:
            futures = [first, *iterator]
            bar.reset(total=len(futures))
            for future in as_completed(futures, timeout=timeout):
                bar.update(1)
                yield future
            return
        bar.update(1)
        yield first
        for value in iterator:
            bar.update(1)
            yield value


_NOTHING = object()
