"""Serve the `fedlease/full` deployment from this process (started by `make up`)."""

from __future__ import annotations

from flows.fedlease_flow import fedlease_flow

if __name__ == "__main__":
    fedlease_flow.serve(name="full", parameters={"params": "params.yaml", "overrides": []},
                        description="The whole FedLEASE pipeline on params.yaml (override keys with `overrides`).")
