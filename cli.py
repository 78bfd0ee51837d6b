"""`python cli.py ...` runs the same Typer app as the `minimosaic` command (see minimosaic/cli.py)."""
from minimosaic.cli import main

if __name__ == "__main__":
    main()
