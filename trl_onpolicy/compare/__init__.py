"""`trl-onpolicy compare`: train and evaluate several methods on the same data, budget and seeds."""
