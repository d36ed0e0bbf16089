"""Cluster agent: one per Ray cluster, drives application masters there."""
