from tcptrace.cli import main

main()
