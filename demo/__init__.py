"""The project's demo (``edge-demo``, ``make demo``): the products together.

The one package that imports both the fleet and the agent: it runs a fleet service,
store agents and a cloud endpoint in one process to show a gated rollout end to end
(``fleet_story``). It sits above ``agent``, ``fleet`` and ``converters``, which never
import each other nor this package (import-linter contracts in pyproject.toml).
"""
