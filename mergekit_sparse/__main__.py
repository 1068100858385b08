"""`python -m mergekit_sparse`: the `sparsemerge` command line (an entry point, like the console script)."""

from mergekit_sparse.cli.main import main

if __name__ == "__main__":
    main()
