"""The evaluate stage: baselines fitted and tuned, every method scored with the protocol
library (`ray_app.protocol`), the report and its plots."""
