"""`python -m neuronserve.deploy.loadtest ...` runs the same command as `neuronserve loadtest ...`."""

from neuronserve.deploy.loadtest.cli import main

raise SystemExit(main())
