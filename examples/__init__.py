"""Example models for servefleet (import paths such as ``examples.iris:IrisClassifier``)."""
