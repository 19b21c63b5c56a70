"""Training methods: each turns two networks' logits and the labels into per-sample losses;
``selection`` decides which samples update the networks."""
