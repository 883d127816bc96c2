from tiahnm.cli import main

main()
