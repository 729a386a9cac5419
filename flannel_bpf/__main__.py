from flannel_bpf.cli import main

raise SystemExit(main())
