"""Example 2: a parameter sweep is one ``executor.map`` call.

An SIR epidemic model is simulated for every (infection rate, recovery rate) pair of a grid; each
simulation is one call of ``peak_infected``. ``chunksize`` packs several calls into one grid task
(fewer, bigger tasks for short calls); ``progress`` shows a tqdm progress bar (on stderr) over the
results, which come back in input order. The second sweep reads its points from a generator with
``buffersize``: only that many tasks are in flight, so a huge or endless sweep runs in bounded
memory.

    python examples/parameter_sweep.py
"""

import itertools

from htcgrid_executor import HTCGridExecutor
from htcgrid_executor.progress import progress

INFECTION_RATES = [0.2, 0.3, 0.4, 0.5, 0.6]  # beta, per day
RECOVERY_RATES = [0.05, 0.1, 0.15, 0.2]  # gamma, per day


def peak_infected(beta: float, gamma: float, days: int = 200, steps_per_day: int = 10) -> float:
    """Largest infected fraction of an SIR epidemic started by 0.1 % infected (Euler steps)."""
    s, i = 0.999, 0.001
    dt = 1.0 / steps_per_day
    peak = i
    for _ in range(days * steps_per_day):
        new_infections = beta * s * i * dt
        s, i = s - new_infections, i + new_infections - gamma * i * dt
        peak = max(peak, i)
    return peak


def main() -> None:
    pairs = list(itertools.product(INFECTION_RATES, RECOVERY_RATES))
    betas = [beta for beta, _ in pairs]
    gammas = [gamma for _, gamma in pairs]

    with HTCGridExecutor(max_workers=2) as executor:
        results = executor.map(peak_infected, betas, gammas, chunksize=4)
        peaks = list(progress(results, total=len(pairs), desc="sweep"))

        print("peak infected, % of the population")
        print("           " + "".join(f"{f'gamma={gamma}':>12}" for gamma in RECOVERY_RATES))
        for row, beta in enumerate(INFECTION_RATES):
            cells = peaks[row * len(RECOVERY_RATES):(row + 1) * len(RECOVERY_RATES)]
            print(f"{f'beta={beta}':<11}" + "".join(f"{100 * peak:12.2f}" for peak in cells))

        # A sweep too large to hold: a generator of points, at most 8 tasks in flight at once.
        fine_betas = (0.2 + 0.001 * k for k in range(400))
        fine = executor.map(peak_infected, fine_betas, itertools.repeat(0.1), chunksize=25, buffersize=8)
        worst = max(fine)
        print(f"fine sweep of 400 infection rates: worst peak {100 * worst:.2f} %")


if __name__ == "__main__":
    main()
