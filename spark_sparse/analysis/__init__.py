"""Analysis of pretraining runs: the ablation summary and the linear probe."""
