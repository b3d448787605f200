"""Ray Serve deployments: thin shims over ``rerank_core`` (ingress, preprocess, scorer, batch jobs)."""
