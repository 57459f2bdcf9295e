"""``python -m ctgridit`` runs the command-line interface."""

from ctgridit.cli import main

if __name__ == "__main__":
    main()
