from ptanet.cli import main

raise SystemExit(main())
