"""``python -m volunteer`` runs the command-line interface."""

from volunteer.cli.app import main

if __name__ == "__main__":
    main()
