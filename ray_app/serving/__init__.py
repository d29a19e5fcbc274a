"""The serve command: the re-ranker as a Ray Serve application."""
