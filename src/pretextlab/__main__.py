from pretextlab.cli import main

raise SystemExit(main())
