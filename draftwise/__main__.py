from draftwise.cli import main

raise SystemExit(main())
