import sys

from manager.cluster.cli import main

sys.exit(main())
