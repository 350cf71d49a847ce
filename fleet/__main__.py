"""``python -m fleet`` = ``edge-fleet`` (the systemd unit and the container use this form:
it does not depend on the path the venv's console scripts were written for)."""

import sys

from edgefleet.fleet.cli import main

sys.exit(main())
