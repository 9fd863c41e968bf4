from rela.cli import main

raise SystemExit(main())
