"""``python -m spark_sparse.report``: summary of a pretraining sweep; the code lives in spark_sparse/analysis/report.py."""

from .analysis.report import main

if __name__ == "__main__":
    main()
