from client_lib.cli import main

main()
