"""Input: data sources, label subsets, SimCLR augmentations (TF on the host, JAX on the device) and
the host pipelines that feed global batches to the train step."""
