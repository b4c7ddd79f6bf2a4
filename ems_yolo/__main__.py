"""`python -m ems_yolo <command> key=value ...`: the `ems-yolo` command, also as a module (e.g. for `torchrun -m`)."""

from ems_yolo.cli import main

if __name__ == "__main__":
    main()
