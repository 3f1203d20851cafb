"""Speed levels: named combinations of the fewer-passes knobs, chosen by measurement (README, "Fewer passes").

`exact` is the reference sampler. `fast` and `fastest` guide only part of the steps and cache between refresh
steps (`step_cache`); their measured cost and quality are in the README. The knobs stay available one by one: a knob
given with a level replaces the level's value for that knob.
"""

from __future__ import annotations

from .step_cache import CachePlan

SPEEDS = ("exact", "fast", "fastest")
# the pipeline keywords each level sets (the rest keep their defaults)
LEVELS: dict[str, dict] = {
    "exact": {},
    "fast": {"guidance_interval": (0.5, 1.0), "step_cache": CachePlan(warmup=0.3, every=4, share=0.25),
             "draws": "cdf"},
    "fastest": {"guidance_interval": (0.5, 1.0), "step_cache": CachePlan(warmup=0.15, every=8, share=0.15),
                "draws": "cdf"},
}
# draws None: "reference" (the reference's random stream), unless a level says otherwise
KNOB_DEFAULTS = {"guidance_interval": None, "guidance_ramp": False, "order": "confidence", "step_cache": None,
                 "masking_schedule": None, "draws": None}


def sampling_settings(speed: str | None, **knobs) -> dict:
    """The pipeline keywords for `speed` (None: exact) with the knobs given (those not at their default) on top.

    `exact` is the reference sampler, so it refuses knobs that change sampling; pass those without a level."""
    if speed is not None and speed not in SPEEDS:
        raise ValueError(f"speed={speed!r} is not one of {', '.join(SPEEDS)}")
    unknown = set(knobs) - set(KNOB_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown sampling knob(s) {sorted(unknown)}")
    given = {k: v for k, v in knobs.items() if v != KNOB_DEFAULTS[k]}
    if speed == "exact" and given:
        raise ValueError(f"speed='exact' is the reference sampler and cannot take {', '.join(sorted(given))}: "
                         f"drop the speed level (or pick fast/fastest) to change those")
    settings = {**KNOB_DEFAULTS, **LEVELS.get(speed or "exact", {}), **given}
    return {**settings, "draws": settings["draws"] or "reference"}


def describe(speed: str) -> str:
    """One line naming what a level does."""
    settings = LEVELS[speed]
    if not settings:
        return "exact: every step guided, full passes (the reference sampler)"
    plan = settings["step_cache"]
    start, end = settings["guidance_interval"]
    return (f"{speed}: guidance on steps in [{start:g}, {end:g}) of the run; full passes on the first "
            f"{plan.warmup:.0%} of the steps and every {plan.every} after, {plan.share:.0%} of the positions between; "
            f"tokens drawn by inverse CDF")
