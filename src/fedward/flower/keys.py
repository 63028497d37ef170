"""The record names of fedward's Flower messages (:mod:`fedward.flower.records`), in a module
without torch: the ClientApp's SecAgg+ mod reads them too."""

ARRAYS, CONFIG, METRICS, FACTS, REPORT = "arrays", "config", "metrics", "facts", "report"
CLIENT_ID = "client-id"  # the metric naming the replying client
