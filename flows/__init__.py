"""Prefect flows of the FedLEASE pipeline (orchestration only; the maths live in `fedlease/`)."""
