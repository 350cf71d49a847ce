"""edgefleet's shared core: what the agent, the fleet and the converters all use.

The three products (``edgefleet.agent``, ``edgefleet.fleet``, ``edgefleet.converters``)
import this package and never each other (import-linter contracts in pyproject.toml).
Here: the bundle format (``bundle``), the model runtimes (``backends``), model input
and output processing and scoring (``processing``), the MQTT client (``mqtt``), the wire
protocol between agent and fleet (``protocol``), storage primitives (``sqlite_writer``,
``durable``), config primitives (``config``), the one exception tree (``errors``) and
the JSON/HTTP helpers (``http``).
"""

__version__ = "0.1.0"
