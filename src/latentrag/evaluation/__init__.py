"""Evaluation: QA data sets, the paper's metrics, the evaluation loop and its reports, the seed's worked examples."""
