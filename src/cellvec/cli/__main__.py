from cellvec.cli import main

main()
