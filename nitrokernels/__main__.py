from nitrokernels.cli import main

raise SystemExit(main())
