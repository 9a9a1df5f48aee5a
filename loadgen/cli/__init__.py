"""The `tlbsim` command line (its root is main.py):

    main.py      the root: global options, every command, exit codes
    options.py   the options the load commands share, checked into a RunConfig
    load.py      `tlbsim load run|compare|replay|soak`
    chaos.py     `tlbsim chaos KIND`
    tools.py     `tlbsim demo`, `tlbsim bench`, `tlbsim trace record`

`serve` (services/cli.py) and `up`/`down` (services/launcher/commands.py) come from the
services' side, which never imports this package.
"""
