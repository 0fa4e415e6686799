"""The tuner's parts below the API: the format menu, the sensitivity measurement and the allocator.

The loop that builds and gates candidates is lowbit.tuner (it uses the API's verbs).
"""

from lowbit.tuning.allocate import Allocation, for_budget, for_quality, parse_duration, parse_size, uniforms
from lowbit.tuning.measure import Measurement, ModuleCost, measure
from lowbit.tuning.menu import MENU, Option, parse_menu

__all__ = ["Allocation", "for_budget", "for_quality", "parse_duration", "parse_size", "uniforms", "Measurement", "ModuleCost", "measure",
           "MENU", "Option", "parse_menu"]
