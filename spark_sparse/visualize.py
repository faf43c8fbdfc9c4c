"""``python -m spark_sparse.visualize``: reconstruction pictures of a run; the code lives in spark_sparse/train/visualize.py."""

from .train.visualize import main

if __name__ == "__main__":
    main()
