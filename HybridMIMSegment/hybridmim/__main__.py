from hybridmim.cli import main

main()
