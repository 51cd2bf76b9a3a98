from pixcli.cli import main

main()
