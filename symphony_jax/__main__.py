from symphony_jax.cli import main

raise SystemExit(main())
