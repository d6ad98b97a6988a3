"""Example 1: replace ``ProcessPoolExecutor`` with ``HTCGridExecutor``; nothing else changes.

This is the ``ProcessPoolExecutor`` example from the Python documentation with one line changed.
With no deployment configured, ``HTCGridExecutor`` starts an embedded local grid (a real Redis,
HTC-Grid's HTTP routes, ``max_workers`` agent processes) and stops it on leaving the ``with``.

    python examples/drop_in_replacement.py
"""

import math
import os

# from concurrent.futures import ProcessPoolExecutor   # before
from htcgrid_executor import HTCGridExecutor  # after

PRIMES = [1_000_003, 1_000_033, 1_000_037, 1_000_039, 1_000_081, 1_000_001]


def is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    return all(n % i for i in range(3, math.isqrt(n) + 1, 2))


def main() -> None:
    # before: with ProcessPoolExecutor(max_workers=2) as executor:
    with HTCGridExecutor(max_workers=2) as executor:
        for number, prime in zip(PRIMES, executor.map(is_prime, PRIMES), strict=True):
            print(f"{number} is prime: {prime}")

        # submit() returns a real concurrent.futures.Future
        future = executor.submit(math.factorial, 20)
        print(f"20! = {future.result()}")

        # the calls ran in a grid worker process, not in this one
        print(f"this process: {os.getpid()}, grid worker: {executor.submit(os.getpid).result()}")

        # an exception raised on the grid comes back with its own type
        try:
            executor.submit(int, "forty-two").result()
        except ValueError as exc:
            print(f"ValueError came back from the grid: {exc}")


if __name__ == "__main__":
    main()
