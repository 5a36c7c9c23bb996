"""`python -m neuronserve`: the same as the `neuronserve` command."""

import sys

from neuronserve.cli import main

sys.exit(main())
