import sys

from pdlab.bench.cli import main

sys.exit(main())
