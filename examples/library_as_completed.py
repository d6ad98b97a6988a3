"""Example 3: library code written against ``concurrent.futures.Executor`` runs on the grid as it is.

``find_collatz_records`` below is the kind of function a library exposes: it takes *any* executor,
submits work, and handles results with ``as_completed`` as they arrive (failures included). It
knows nothing about HTC-Grid. The caller picks where it runs: a thread pool, a process pool, or
the grid, and gets the same answer from each.

    python examples/library_as_completed.py
"""

from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor, as_completed

from htcgrid_executor import HTCGridExecutor


def longest_collatz_chain(start: int, stop: int) -> tuple[int, int]:
    """(number, chain length) of the longest Collatz chain started in [start, stop)."""
    if start < 1:
        raise ValueError(f"Collatz chains start at 1, not {start}")
    best = (start, 0)
    for n in range(start, stop):
        length, x = 1, n
        while x != 1:
            x = x // 2 if x % 2 == 0 else 3 * x + 1
            length += 1
        best = max(best, (n, length), key=lambda pair: pair[1])
    return best


# ---- library code: any Executor, as_completed ------------------------------------------------


def find_collatz_records(executor: Executor, limit: int, block: int = 10_000) -> tuple[int, int, list[str]]:
    """The number below ``limit`` with the longest Collatz chain, searched in blocks on ``executor``.

    Returns (number, chain length, problems): a block that fails is reported, not fatal.
    """
    futures = {executor.submit(longest_collatz_chain, lo, min(lo + block, limit)): lo
               for lo in range(0, limit, block)}
    best, problems = (0, 0), []
    for future in as_completed(futures):  # in completion order, not submission order
        try:
            number, length = future.result()
        except ValueError as exc:  # the task's own exception type, raised here
            problems.append(f"block at {futures[future]}: {exc}")
            continue
        if length > best[1]:
            best = (number, length)
    return best[0], best[1], problems


# ---- the caller chooses where it runs ---------------------------------------------------------


def main() -> None:
    # The first block holds 0, which has no Collatz chain: that task raises ValueError, and the
    # library reports it the same way whichever executor ran it.
    for name, make in [("threads", lambda: ThreadPoolExecutor(max_workers=2)),
                       ("processes", lambda: ProcessPoolExecutor(max_workers=2)),
                       ("HTC-Grid", lambda: HTCGridExecutor(max_workers=2))]:
        with make() as executor:
            number, length, problems = find_collatz_records(executor, limit=100_000)
        print(f"{name:>9}: longest chain below 100000 starts at {number} ({length} steps); "
              f"problems: {problems}")


if __name__ == "__main__":
    main()
