"""``python -m mmcli.cli``: the same command as the ``mmcli`` console script."""
from mmcli.cli import main

if __name__ == "__main__":
    main()
