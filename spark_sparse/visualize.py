"""``python -m spark_sparse.visualize``: reconstruction pictures of a run; the code lives in
spark_sparse/analysis/visualize.py."""

from .analysis.visualize import main

if __name__ == "__main__":
    main()
