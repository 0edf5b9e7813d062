"""X/Y(/Z) plots: axis kinds (a registry), plans (axes -> jobs), grids (layout, labels, PNG infotext), running.

Core: no gradio. The UI's X/Y tab turns its inputs into `make_plan(...)` and hands the plan to `run_plan` with
the host's `generate_series`.
"""
from lib_lora.xy.axes import AXES, AxisContext, AxisKind, Cell, register_axis
from lib_lora.xy.plan import Axis, AxisRequest, Job, XYPlan, make_plan
from lib_lora.xy.run import XYResult, draw_plot, run_plan, series_of
from lib_lora.xy.values import format_value, parse_values

__all__ = ["AXES", "Axis", "AxisContext", "AxisKind", "AxisRequest", "Cell", "Job", "XYPlan", "XYResult",
           "draw_plot", "format_value", "make_plan", "parse_values", "register_axis", "run_plan", "series_of"]
