"""SparK pretraining, the app: ``python -m spark_sparse.pretrain key=value ...`` (app.py)."""
