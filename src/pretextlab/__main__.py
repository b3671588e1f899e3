"""`python -m pretextlab`: the same command as `pretextlab` (cli.main)."""

from pretextlab.cli import main

raise SystemExit(main())
