"""The network (`RerankerNet`), its artifact, and the `Ranker` that scores with one."""
