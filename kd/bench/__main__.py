from kd.bench.cli import main

main()
