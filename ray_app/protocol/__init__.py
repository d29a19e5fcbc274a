"""How a method is scored: the protocol library, apart from the stage that runs it.

`data` reads a prepare output into the targets every protocol ranks, `metrics`
turns ranks into HR/NDCG/..., `scoring` holds the protocols (sampled, full,
returning users, nightly backtest) and `scorer` the interface a scored method
implements (the baselines, the trained re-ranker). Training's validation, the
evaluate stage and the ablations import this; it imports no stage.
"""
