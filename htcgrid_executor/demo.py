"""The main job: a Monte Carlo parameter sweep, European call prices over strikes × volatilities.

Each grid task prices one (strike, volatility) pair by simulating terminal prices under
Black-Scholes dynamics; the table compares it with the closed-form price. Pure Python (no
numpy), so it runs wherever the package does.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

__all__ = ["OptionQuote", "price_call", "black_scholes_call", "sweep_parameters"]


@dataclass(frozen=True)
class OptionQuote:
    strike: float
    volatility: float
    monte_carlo: float
    std_error: float
    closed_form: float


def black_scholes_call(spot: float, strike: float, rate: float, volatility: float, years: float) -> float:
    """The closed-form price of a European call."""
    d1 = (math.log(spot / strike) + (rate + volatility**2 / 2) * years) / (volatility * math.sqrt(years))
    d2 = d1 - volatility * math.sqrt(years)
    cdf = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731 - local one-liner
    return spot * cdf(d1) - strike * math.exp(-rate * years) * cdf(d2)


def price_call(strike: float, volatility: float, *, spot: float = 100.0, rate: float = 0.02,
               years: float = 1.0, paths: int = 20_000, seed: int = 0) -> OptionQuote:
    """Monte Carlo price of a European call (one grid task)."""
    rng = random.Random(seed * 1_000_003 + int(strike * 1000) + int(volatility * 1000))
    drift = (rate - volatility**2 / 2) * years
    spread = volatility * math.sqrt(years)
    discount = math.exp(-rate * years)
    total = total_sq = 0.0
    for _ in range(paths):
        payoff = max(spot * math.exp(drift + spread * rng.gauss(0.0, 1.0)) - strike, 0.0) * discount
        total += payoff
        total_sq += payoff * payoff
    mean = total / paths
    std_error = math.sqrt(max(total_sq / paths - mean * mean, 0.0) / paths)
    return OptionQuote(strike, volatility, mean, std_error,
                       black_scholes_call(spot, strike, rate, volatility, years))


def sweep_parameters(strikes: list[float], volatilities: list[float]) -> tuple[list[float], list[float]]:
    """The (strike, volatility) grid as two parallel lists, ready for ``executor.map``."""
    pairs = list(itertools.product(strikes, volatilities))
    return [s for s, _ in pairs], [v for _, v in pairs]
