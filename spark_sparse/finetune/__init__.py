"""Fine-tuning and linear evaluation, the app: ``python -m spark_sparse.finetune key=value ...`` (app.py)."""
