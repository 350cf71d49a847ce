import sys

from edgefleet.agent.cli import main

sys.exit(main())
