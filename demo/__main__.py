import sys

from edgefleet.demo.cli import main

sys.exit(main())
