from nanomind.cli import main

main()
