"""The aggregator: combines a run's stored job results into the contract's tables."""
