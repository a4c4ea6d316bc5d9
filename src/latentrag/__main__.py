import sys

from latentrag.cli import main

sys.exit(main())
