"""``python -m diffusekit`` runs the command-line tool."""

from diffusekit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
