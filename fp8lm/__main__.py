from fp8lm.entrypoints.cli import main

raise SystemExit(main())
