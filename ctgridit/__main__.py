"""``python -m ctgridit`` runs the command-line interface."""

from ctgridit.entry import main

if __name__ == "__main__":
    main()
