from dinosae.cli import main

raise SystemExit(main())
